"""A synthetic BraTS-2020-style dataset, written as real NIfTI files.

Each case is a brain-shaped ellipsoid with a smooth, noisy boundary on an exact-zero
background, four MRI contrasts (flair, t1, t1ce, t2) with smooth tissue texture and
noise, and a tumour made of nested regions: edema (2) around a core whose rim enhances
(4) and whose inside is necrotic (1). Every fourth case has no enhancing tumour, as
some BraTS LGG cases. Everything is vectorised numpy: a 64x64x48 case takes a few
tens of milliseconds plus the gzip write (about a second with ``anatomy``: the folded
cortex, ventricles, textures, bias field and partial-volume edges of
:mod:`medtune.data.synth.anatomy`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

SYNTH_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

# Mean intensity of each tissue per modality (flair, t1, t1ce, t2), arbitrary units
# scaled later; what matters is the contrast pattern the real sequences show.
_TISSUE_CONTRAST = {
    "grey": (0.55, 0.70, 0.65, 0.60),
    "white": (0.45, 0.95, 0.85, 0.40),
    "edema": (1.35, 0.55, 0.60, 1.45),
    "necrosis": (0.80, 0.35, 0.25, 1.70),
    "enhancing": (1.05, 0.70, 1.90, 1.00),
}


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: int = 6) -> np.ndarray:
    """Smooth random field of ``shape``, about unit std: coarse noise upsampled (cubic)."""
    coarse_shape = [max(2, min(cells, n)) for n in shape]
    coarse = rng.standard_normal(coarse_shape)
    zoom = [n / c for n, c in zip(shape, coarse_shape)]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    field = field[tuple(slice(0, n) for n in shape)]
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _ellipsoid_distance(grid: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised distance: < 1 inside the ellipsoid ``centre, radii`` (voxels)."""
    squared = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return np.sqrt(squared)


def synthesize_case(
    rng: np.random.Generator, shape: Sequence[int], with_enhancing: bool = True, anatomy: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case.

    ``anatomy`` 1 (or True): healthy tissue with a folded cortex, ventricles, a texture per
    tissue, a bias field and partial-volume edges (:mod:`medtune.data.synth.anatomy`)
    instead of a plain grey/white mix; the tumour and its label are drawn the same way.
    ``anatomy`` 2: the same, and each case's tumour contrasts are drawn part of the way
    towards healthy tissue's, by a random amount per class and modality
    (:func:`subtle_tumour_contrast`): as in real scans, a voxel's intensities no longer
    decide its class, its shape and surroundings have to.

    Returns:
        image ``(4, H, W, D)`` float32 in modality order (flair, t1, t1ce, t2), exactly
        0 outside the brain and > 0 inside; label ``(H, W, D)`` uint8 in {0, 1, 2, 4}.
    """
    shape = tuple(int(n) for n in shape)
    grid = [g.astype(np.float32) for g in np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")]
    centre = [(n - 1) / 2 + rng.uniform(-0.03, 0.03) * n for n in shape]
    radii = [n * rng.uniform(0.38, 0.45) for n in shape]
    boundary_noise = 0.06 * smooth_noise(rng, shape, cells=5)
    brain = _ellipsoid_distance(grid, centre, radii) + boundary_noise < 1.0

    # Tumour: an edema blob around a core, both with noisy boundaries, inside the brain.
    edema_radius = min(shape) * rng.uniform(0.12, 0.22)
    offset = [rng.uniform(-0.35, 0.35) * (r - edema_radius) for r in radii]
    tumour_centre = [c + o for c, o in zip(centre, offset)]
    stretch = rng.uniform(0.8, 1.25, size=3)
    tumour_noise = smooth_noise(rng, shape, cells=7)
    edema_distance = _ellipsoid_distance(grid, tumour_centre, [edema_radius * s for s in stretch])
    edema_distance = edema_distance + 0.12 * tumour_noise
    core_fraction = rng.uniform(0.45, 0.65)
    label = np.zeros(shape, dtype=np.uint8)
    label[edema_distance < 1.0] = 2
    core = edema_distance < core_fraction
    label[core] = 1
    if with_enhancing:
        rim = core & (edema_distance > core_fraction * rng.uniform(0.55, 0.75))
        label[rim] = 4
    label[~brain] = 0

    if anatomy:
        image = _anatomical_image(rng, grid, centre, radii, boundary_noise, brain, label, subtle=int(anatomy) >= 2)
        return image, label

    # Tissue map: grey/white matter mixed by a smooth field, then the tumour classes.
    white_weight = 1.0 / (1.0 + np.exp(-2.5 * smooth_noise(rng, shape, cells=8)))
    texture = smooth_noise(rng, shape, cells=12)
    contrast = {name: np.asarray(v, dtype=np.float32) for name, v in _TISSUE_CONTRAST.items()}
    healthy = (
        contrast["grey"][:, None, None, None] * (1 - white_weight)
        + contrast["white"][:, None, None, None] * white_weight
    )
    tumour_tissue = np.stack(
        [contrast["edema"], contrast["necrosis"], contrast["enhancing"]]
    )  # (3, 4): per tumour class, per modality
    class_of = np.full(shape, -1, dtype=np.int64)
    class_of[label == 2] = 0
    class_of[label == 1] = 1
    class_of[label == 4] = 2
    intensity = healthy.astype(np.float32)
    in_tumour = class_of >= 0
    intensity[:, in_tumour] = tumour_tissue[class_of[in_tumour]].T
    intensity *= 1.0 + 0.08 * texture[None]
    intensity += 0.04 * rng.standard_normal(intensity.shape).astype(np.float32)
    scale = rng.uniform(300, 600, size=4).astype(np.float32)[:, None, None, None]
    image = np.clip(intensity, 0.02, None) * scale
    image[:, ~brain] = 0.0
    return image.astype(np.float32), label


def _tumour_classes(label: np.ndarray) -> np.ndarray:
    """Index of each voxel's tumour tissue (0 edema, 1 necrosis, 2 enhancing), -1 elsewhere."""
    class_of = np.full(label.shape, -1, dtype=np.int64)
    for index, value in enumerate((2, 1, 4)):
        class_of[label == value] = index
    return class_of


def subtle_tumour_contrast(rng: np.random.Generator, contrast: dict[str, np.ndarray]) -> np.ndarray:
    """``(3, 4)`` tumour contrasts (edema, necrosis, enhancing; per modality) of one case,
    each moved from the class's own contrast towards a healthy tissue's (edema and
    enhancing tumour towards the grey/white average, necrosis towards CSF) by a fraction
    drawn uniformly in [0.4, 0.9] per class and modality: the classes overlap healthy
    tissue and vary from case to case."""
    own = np.stack([contrast["edema"], contrast["necrosis"], contrast["enhancing"]])
    parenchyma = (contrast["grey"] + contrast["white"]) / 2
    healthy = np.stack([parenchyma, contrast["csf"], parenchyma])
    fraction = rng.uniform(0.4, 0.9, size=own.shape).astype(np.float32)
    return own + fraction * (healthy - own)


def _anatomical_image(rng, grid, centre, radii, boundary_noise, brain, label, subtle: bool = False) -> np.ndarray:
    """``(4, H, W, D)`` image of :func:`synthesize_case` with ``anatomy`` 1, or 2 (``subtle``)."""
    from medtune.data.synth import anatomy

    shape = label.shape
    contrast = {name: np.asarray(v, dtype=np.float32) for name, v in _TISSUE_CONTRAST.items()}
    contrast["csf"] = np.asarray(anatomy.CSF_CONTRAST, dtype=np.float32)
    radial = _ellipsoid_distance(grid, centre, radii) + boundary_noise
    fractions = anatomy.healthy_fractions(rng, grid, radial, centre, radii, smooth_noise)
    intensity = anatomy.textured_intensity(rng, fractions, contrast, smooth_noise)
    class_of = _tumour_classes(label)
    in_tumour = class_of >= 0
    texture = anatomy.tumour_texture(rng, shape)
    tumour_tissue = (subtle_tumour_contrast(rng, contrast) if subtle  # (3, 4): per tumour class, per modality
                     else np.stack([contrast["edema"], contrast["necrosis"], contrast["enhancing"]]))
    intensity[:, in_tumour] = tumour_tissue[class_of[in_tumour]].T * (1.0 + texture[in_tumour])[None]
    intensity = anatomy.partial_volume(intensity) * anatomy.bias_field(rng, grid, len(intensity))
    intensity += 0.04 * rng.standard_normal(intensity.shape).astype(np.float32)
    scale = rng.uniform(300, 600, size=4).astype(np.float32)[:, None, None, None]
    image = np.clip(intensity, 0.02, None) * scale
    image[:, ~brain] = 0.0
    return image.astype(np.float32)


def synthesize_brats(
    out_dir: str | Path,
    cases: int = 4,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    prefix: str = "BraTS20_Training",
    anatomy: int = 0,
) -> list[Path]:
    """Write ``cases`` synthetic BraTS-2020-style cases under ``out_dir``.

    ``anatomy`` 1: anatomy-like healthy tissue (see :func:`synthesize_case`); 2: that, with
    tumour contrasts that overlap healthy tissue and vary by case; 0: the plain grey/white
    mix.

    Files: ``<out_dir>/<prefix>_001/<prefix>_001_{flair,t1,t1ce,t2,seg}.nii.gz`` with a
    1 mm identity affine; images int16, labels uint8 in {0, 1, 2, 4}. Cases with index
    ``i % 4 == 3`` (the 4th, 8th, ...) have no enhancing tumour.

    Returns:
        the case folders, in order.
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {tuple(shape)}")
    if anatomy not in (0, 1, 2):
        raise ValueError(f"anatomy must be 0, 1 or 2, got {anatomy}")
    out_dir = Path(out_dir)
    affine = np.eye(4)
    folders = []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        image, label = synthesize_case(rng, shape, with_enhancing=(i % 4 != 3), anatomy=int(anatomy))
        case_id = f"{prefix}_{i + 1:03d}"
        folder = out_dir / case_id
        folder.mkdir(parents=True, exist_ok=True)
        for m, modality in enumerate(SYNTH_MODALITIES):
            voxels = np.round(image[m]).astype(np.int16)
            # rounding must not turn a brain voxel into background
            voxels[(voxels == 0) & (image[m] > 0)] = 1
            nib.save(nib.Nifti1Image(voxels, affine), str(folder / f"{case_id}_{modality}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / f"{case_id}_seg.nii.gz"))
        folders.append(folder)
    log.debug("wrote %d synthetic BraTS cases of shape %s to %s", cases, tuple(shape), out_dir)
    return folders
