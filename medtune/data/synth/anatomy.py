"""Anatomy-like structure for the generated brains of :mod:`medtune.data.synth.brats`.

``synthesize_case(..., anatomy=True)`` builds its healthy tissue here instead of a plain
grey/white mix, so that the volumes carry the kind of structure self-supervised
pretraining can learn and a segmenter can use:

- a folded cortex: a grey-matter ribbon under the surface whose sulci (thin sheets of
  CSF lined with grey matter, the zero-level set of a smooth random field) reach into
  the brain; two ventricles and a deep grey nucleus;
- tissue fractions instead of hard labels (partial-volume edges: a voxel on a boundary
  mixes the contrasts of its tissues), and a light blur of the final image;
- a texture per tissue (smooth in white matter, granular in grey matter and necrosis);
- a smooth multiplicative bias field, shared by the contrasts with a small part of
  each contrast's own.

Everything is vectorised numpy on the volume's grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

# flair, t1, t1ce, t2: CSF is dark on flair and t1, bright on t2
CSF_CONTRAST = (0.15, 0.25, 0.25, 1.90)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


def granular_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float = 0.8) -> np.ndarray:
    """Fine-grained texture of ``shape``: white noise blurred by ``sigma`` voxels, unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def healthy_fractions(
    rng: np.random.Generator,
    grid: list[np.ndarray],
    radial: np.ndarray,
    centre: Sequence[float],
    radii: Sequence[float],
    smooth_noise,
) -> dict[str, np.ndarray]:
    """Fractions of ``csf``, ``grey`` and ``white`` matter per voxel (summing to 1).

    Args:
        grid: voxel coordinates per axis, each ``(H, W, D)``.
        radial: the brain's normalised distance, < 1 inside (noisy ellipsoid).
        centre, radii: the brain ellipsoid in voxels.
        smooth_noise: ``smooth_noise(rng, shape, cells)`` of the calling module.
    """
    shape = radial.shape
    fold = smooth_noise(rng, shape, cells=max(6, min(shape) // 5))  # its zero set: the sulci
    depth = 0.2 + 0.04 * smooth_noise(rng, shape, cells=4)  # cortex thickness, as a fraction of the radius
    outer = sigmoid((radial - (1.0 - depth)) / 0.025)  # the ribbon under the surface
    sulcus_reach = sigmoid((radial - 0.5) / 0.04)  # sulci stop halfway in
    sulcus = sigmoid((0.1 - np.abs(fold)) / 0.03) * sulcus_reach
    lining = sigmoid((0.32 - np.abs(fold)) / 0.04) * sulcus_reach
    ventricles = np.zeros(shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        lobe_centre = [c + side * 0.18 * r if axis == 1 else c for axis, (c, r) in enumerate(zip(centre, radii))]
        lobe_radii = [r * f for r, f in zip(radii, (0.35, 0.1, 0.25))]
        distance = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, lobe_centre, lobe_radii)))
        ventricles = np.maximum(ventricles, sigmoid((1.0 - distance) / 0.12))
    nucleus_centre = [c + rng.uniform(-0.1, 0.1) * r for c, r in zip(centre, radii)]
    nucleus = np.sqrt(sum(((g - c) / (0.16 * r)) ** 2 for g, c, r in zip(grid, nucleus_centre, radii)))
    csf = np.maximum(sulcus, ventricles)
    grey = np.clip(np.maximum(np.maximum(outer, lining), sigmoid((1.0 - nucleus) / 0.1)), 0.0, 1.0) * (1.0 - csf)
    return {"csf": csf, "grey": grey, "white": np.clip(1.0 - csf - grey, 0.0, 1.0)}


def textured_intensity(
    rng: np.random.Generator,
    fractions: dict[str, np.ndarray],
    contrast: dict[str, np.ndarray],
    smooth_noise,
) -> np.ndarray:
    """``(4, H, W, D)`` mean intensity: each tissue's contrast times its own texture,
    weighted by its fraction."""
    shape = next(iter(fractions.values())).shape
    textures = {
        "white": 0.06 * smooth_noise(rng, shape, cells=max(8, min(shape) // 3)),
        "grey": 0.10 * granular_noise(rng, shape),
        "csf": 0.03 * granular_noise(rng, shape, sigma=1.5),
    }
    intensity = np.zeros((len(CSF_CONTRAST), *shape), dtype=np.float32)
    for tissue, fraction in fractions.items():
        intensity += contrast[tissue][:, None, None, None] * (fraction * (1.0 + textures[tissue]))[None]
    return intensity


def tumour_texture(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Heterogeneous texture inside the tumour (granular, stronger than healthy tissue's)."""
    return 0.12 * granular_noise(rng, shape, sigma=1.0)


def smooth_polynomial(rng: np.random.Generator, grid: list[np.ndarray]) -> np.ndarray:
    """A random quadratic of the voxel coordinates (scaled to [-1, 1]), unit std."""
    axes = [2.0 * g / max(1.0, float(g.max())) - 1.0 for g in grid]
    terms = axes + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    field = sum(rng.standard_normal() * term for term in terms)
    return (field / (field.std() + 1e-8)).astype(np.float32)


def bias_field(rng: np.random.Generator, grid: list[np.ndarray], contrasts: int) -> np.ndarray:
    """``(contrasts, H, W, D)`` smooth multiplicative field around 1: a shared part and a
    smaller part per contrast (the coil's field as each sequence sees it)."""
    common = smooth_polynomial(rng, grid)
    own = np.stack([smooth_polynomial(rng, grid) for _ in range(contrasts)])
    return np.exp(0.15 * common[None] + 0.05 * own).astype(np.float32)


def partial_volume(intensity: np.ndarray, sigma: float = 0.6) -> np.ndarray:
    """Blur each contrast by ``sigma`` voxels: edges mix their tissues, as a scanner's
    point spread does."""
    return np.stack([ndimage.gaussian_filter(channel, sigma) for channel in intensity]).astype(np.float32)


__all__ = [
    "CSF_CONTRAST",
    "bias_field",
    "granular_noise",
    "healthy_fractions",
    "partial_volume",
    "smooth_polynomial",
    "textured_intensity",
    "tumour_texture",
]
