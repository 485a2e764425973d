"""A synthetic single-modality CT task in the Medical Segmentation Decathlon layout.

What a real MSD CT task (Liver, Spleen, Pancreas, ...) looks like on disk, small::

    imagesTr/ct_001.nii.gz   3D int16 Hounsfield units, one file per case
    labelsTr/ct_001.nii.gz   uint8: 0 background, 1 organ, 2 lesion
    imagesTs/ct_101.nii.gz   unlabeled test cases
    dataset.json             modality {"0": "CT"}, labels, training and test lists

Each case is a body (an elliptic cylinder of soft tissue under a layer of fat, with a
bone in it) in air (-1000 HU, so the background is not 0), an organ and, in three
cases out of four, a lesion inside the organ. Voxels are anisotropic, thick slices
(in-plane 0.7-0.9 mm, slices 3-5 mm), and the files come in several orientations
(LPS like DICOM exports, RAS, and PSR with the axes permuted), as mixed real data does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations

from medtune.data.synth.brats import smooth_noise

log = logging.getLogger(__name__)

ORIENTATIONS: tuple[str, ...] = ("LPS", "RAS", "PSR")
LABELS = {"0": "background", "1": "organ", "2": "lesion"}
_AIR, _FAT, _TISSUE, _ORGAN, _LESION, _BONE = -1000.0, -100.0, 40.0, 130.0, 60.0, 700.0


def _ellipsoid(grid: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1.0


def synthesize_ct_case(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], with_lesion: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One case on a RAS grid of ``shape`` voxels of ``spacing`` mm.

    Returns:
        image ``(X, Y, Z)`` float32 in HU (air -1000), label ``(X, Y, Z)`` uint8 in {0, 1, 2}.
    """
    shape = tuple(int(n) for n in shape)
    grid = [np.arange(n, dtype=np.float32)[tuple(slice(None) if a == i else None for a in range(3))] * s
            for i, (n, s) in enumerate(zip(shape, spacing))]  # mm, broadcastable
    extent = [n * s for n, s in zip(shape, spacing)]
    centre = [e / 2 for e in extent]
    # body: an elliptic cylinder along z (the patient's long axis), fat under the skin
    body_radii = [extent[0] * rng.uniform(0.38, 0.45), extent[1] * rng.uniform(0.32, 0.4)]
    body = np.broadcast_to(_ellipsoid(grid[:2], centre[:2], body_radii), shape)  # (X, Y, 1) along z
    inner = np.broadcast_to(_ellipsoid(grid[:2], centre[:2], [r * 0.85 for r in body_radii]), shape)
    organ_centre = [centre[0] + rng.uniform(-0.15, 0.15) * extent[0], centre[1] + rng.uniform(-0.1, 0.1) * extent[1],
                    centre[2] + rng.uniform(-0.1, 0.1) * extent[2]]
    organ_radii = [extent[0] * rng.uniform(0.16, 0.22), extent[1] * rng.uniform(0.14, 0.2), extent[2] * rng.uniform(0.3, 0.4)]
    organ = _ellipsoid(grid, organ_centre, organ_radii) & inner
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    if with_lesion:
        lesion_centre = [c + rng.uniform(-0.3, 0.3) * r for c, r in zip(organ_centre, organ_radii)]
        lesion = _ellipsoid(grid, lesion_centre, [r * rng.uniform(0.35, 0.5) for r in organ_radii]) & organ
        label[lesion] = 2
    bone_centre = [centre[0], centre[1] - 0.25 * extent[1]]
    bone = np.broadcast_to(_ellipsoid(grid[:2], bone_centre, [extent[0] * 0.06, extent[1] * 0.06]), shape) & inner
    image = np.full(shape, _AIR, dtype=np.float32)
    image[body] = _FAT
    image[inner] = _TISSUE
    image[bone] = _BONE
    image[label == 1] = _ORGAN
    image[label == 2] = _LESION
    texture = smooth_noise(rng, shape, cells=6)
    image[body] += 8.0 * texture[body] + rng.normal(0.0, 12.0, size=int(body.sum())).astype(np.float32)
    image[~body] += rng.normal(0.0, 5.0, size=int((~body).sum())).astype(np.float32)
    return np.clip(image, -1024, 3071), label


def _store(array: np.ndarray, spacing: Sequence[float], axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """A RAS array and its spacing -> the array and affine of a file in ``axcodes``."""
    ras_affine = np.diag([*map(float, spacing), 1.0])
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(axcodes))
    stored = orientations.apply_orientation(array, transform)
    affine = ras_affine @ orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(stored), affine


def synthesize_ct(
    out_dir: str | Path,
    cases: int = 4,
    shape: Sequence[int] = (48, 48, 12),
    seed: int = 0,
    test_cases: int = 1,
) -> list[Path]:
    """Write an MSD-layout CT task under ``out_dir``: ``cases`` labeled cases and
    ``test_cases`` unlabeled ones of ``shape`` voxels (RAS order before the file's own
    orientation), spacing about 0.8 x 0.8 x 4 mm. Case ``i`` is stored in orientation
    ``ORIENTATIONS[i % 3]``; every fourth case has no lesion.

    Returns:
        the image files written, training then test.
    """
    if cases < 1 or test_cases < 0:
        raise ValueError(f"need cases >= 1 and test_cases >= 0, got {cases}, {test_cases}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {tuple(shape)}")
    out_dir = Path(out_dir)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    written, training, test = [], [], []
    for i in range(cases + test_cases):
        rng = np.random.default_rng([seed, i])
        in_plane = rng.choice([0.7, 0.8, 0.9])
        spacing = (float(in_plane), float(in_plane), float(rng.choice([3.0, 4.0, 5.0])))
        image, label = synthesize_ct_case(rng, shape, spacing, with_lesion=(i % 4 != 3))
        axcodes = ORIENTATIONS[i % len(ORIENTATIONS)]
        stored_image, affine = _store(np.round(image).astype(np.int16), spacing, axcodes)
        labeled = i < cases
        name = f"ct_{i + 1:03d}.nii.gz" if labeled else f"ct_{101 + i - cases:03d}.nii.gz"
        path = out_dir / ("imagesTr" if labeled else "imagesTs") / name
        nib.save(nib.Nifti1Image(stored_image, affine), str(path))
        written.append(path)
        if labeled:
            stored_label, _ = _store(label, spacing, axcodes)
            nib.save(nib.Nifti1Image(stored_label, affine), str(out_dir / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "SynthCT", "description": "generated CT-like task (medtune data synth --kind ct)",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": LABELS,
        "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.debug("wrote a synthetic CT task of %d + %d cases to %s", cases, test_cases, out_dir)
    return written


__all__ = ["ORIENTATIONS", "synthesize_ct", "synthesize_ct_case"]
