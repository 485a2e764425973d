"""What the data decides for a run: the training grid and the intensity transform.

A run plans its data once (:func:`plan_grid`, :func:`fit_normalizer`) and records the
:class:`DataPlan` in its ``config.json``; the cache brings training cases to that plan,
and prediction (:meth:`DataPlan.prepare`) brings new cases to it the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtune.data.cache import VolumeCache
from medtune.data.cases import Case
from medtune.data.geometry import (
    CaseGrid,
    Grid,
    affine_problem,
    canonical_axcodes,
    format_spacing,
    plan_spacing,
    to_training_grid,
)
from medtune.data.intensity import DEFAULT_BODY_THRESHOLD, ChannelNorm, Normalizer, ct_statistics, sample_foreground

log = logging.getLogger(__name__)


@dataclass
class PreparedCase:
    """A case as the model sees it: on the training grid, cropped, normalised."""

    image: np.ndarray  # (M, h, w, d) float32, cropped to bbox
    grid: CaseGrid  # the file's grid -> the training grid (to map predictions back)
    bbox: tuple[tuple[int, int], ...]  # the crop on the training grid
    shape: tuple[int, int, int]  # the training grid's shape before the crop


@dataclass
class DataPlan:
    """What the data decided for a run: the training grid and the intensity transform.

    A run records it (``config.json``'s derived facts); prediction brings new cases to
    the same grid and normalises them the same way (:meth:`prepare`).
    """

    axcodes: str | None  # None: each file's own axes (runs made before the training grid)
    spacing: list[float] | None
    normalizer: Normalizer
    body_threshold: float = DEFAULT_BODY_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        return {"axcodes": self.axcodes, "spacing": self.spacing, "normalization": self.normalizer.to_json(),
                "body_threshold": self.body_threshold}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DataPlan":
        return cls(data.get("axcodes"), data.get("spacing"), Normalizer.from_json(data["normalization"]),
                   float(data.get("body_threshold", DEFAULT_BODY_THRESHOLD)))

    @classmethod
    def untouched(cls, channels: int) -> "DataPlan":
        """The files' own grid, z-score per channel (what runs before the training grid did)."""
        return cls(None, None, Normalizer([ChannelNorm("zscore")] * channels))

    def prepare(self, image: np.ndarray, affine: np.ndarray | None = None) -> PreparedCase:
        """The path of a case through prediction, the same as through the cache: to the
        training grid (``affine`` None: ``image`` is on it already), crop to the
        foreground box, normalise. ``image (M, H, W, D)`` as read."""
        from medtune.data.intensity import foreground
        from medtune.data.preprocess import crop_to_bbox, nonzero_bbox

        if self.axcodes is None or affine is None:
            grid = Grid(tuple(int(n) for n in image.shape[1:]), np.eye(4) if affine is None else np.asarray(affine))
            case_grid = CaseGrid(grid, grid, grid)
        else:
            image, _, case_grid = to_training_grid(image, None, affine, self.axcodes, self.spacing)
        schemes = self.normalizer.schemes
        bbox = nonzero_bbox(foreground(image, schemes, self.body_threshold, "any"))
        cropped = self.normalizer(crop_to_bbox(image, bbox))
        return PreparedCase(cropped, case_grid, bbox, tuple(int(n) for n in image.shape[1:]))


def _header_grid(case: Case) -> Grid:
    """The first image file's grid, from its header alone (refused, naming the case and
    file, when its affine cannot place the volume: see :func:`~medtune.data.geometry.affine_problem`)."""
    from medtune.data.volume import open_nifti
    from medtune.errors import DataError

    img = open_nifti(case.images[0], case.case_id)
    if (problem := affine_problem(img.affine)) is not None:
        raise DataError(f"case {case.case_id}: {case.images[0]}: {problem}; the case cannot be placed in space")
    return Grid(tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64))


def plan_grid(slice_axis: str | int, spacing: str | list[float] | None, cases: list[Case]) -> tuple[str, list[float] | None]:
    """The training grid of ``cases``: axis codes (the slice axis last) and the target
    spacing (``data.spacing``: explicit, None, or ``auto``: planned from the headers)."""
    axcodes = canonical_axcodes(slice_axis)
    if spacing is None or isinstance(spacing, list):
        return axcodes, spacing
    grids = [_header_grid(case).reoriented(axcodes) for case in cases]
    target = plan_spacing([g.spacing for g in grids], [g.shape for g in grids])
    log.info("target spacing %s (median of %d cases, %s axes)", format_spacing(target), len(cases), axcodes)
    return axcodes, target


def fit_normalizer(cache: VolumeCache, schemes: tuple[str, ...], labeled: bool) -> Normalizer:
    """Per-channel normalisation fitted on ``cache`` (the training cases): for CT channels,
    nnU-Net's statistics of foreground voxels (label > 0 when ``labeled``, else the body
    mask), 10,000 voxels per case drawn with a fixed seed."""
    norms = [ChannelNorm(s) for s in schemes]
    ct = [m for m, s in enumerate(schemes) if s == "ct"]
    if not ct:
        return Normalizer(norms)
    samples: dict[int, list[np.ndarray]] = {m: [] for m in ct}
    for index in range(len(cache)):
        volume = cache.load(index)
        mask = np.asarray(volume.label) > 0 if labeled and volume.label is not None else None
        if mask is None or not mask.any():
            mask = np.asarray(volume.foreground)
        for m in ct:
            rng = np.random.default_rng([index, m])
            samples[m].append(sample_foreground(np.asarray(volume.image[m]), mask, rng))
    for m in ct:
        norms[m] = ct_statistics(np.concatenate(samples[m]))
        log.info("CT statistics of channel %d over %d training cases: clip %.1f..%.1f, mean %.1f, std %.1f",
                 m, len(cache), norms[m].low, norms[m].high, norms[m].mean, norms[m].std)
    return Normalizer(norms)




__all__ = ["DataPlan", "PreparedCase", "fit_normalizer", "plan_grid"]
