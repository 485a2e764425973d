"""Referring image segmentation metrics: oIoU, mIoU and prec@X.

For N (prediction, ground truth) binary mask pairs with per-sample intersection I_n and
union U_n (pixel counts):

- overall IoU  ``oIoU = sum_n I_n / sum_n U_n`` (large objects weigh more; what the
  RefCOCO tables report as "oIoU" / "overall IoU"),
- mean IoU     ``mIoU = mean_n (I_n / U_n)`` (every expression weighs the same),
- ``prec@t``    the fraction of samples with ``I_n / U_n > t`` for t in 0.5..0.9.

A sample whose prediction and ground truth are both empty has IoU 1 (nothing to find,
nothing found; the convention of DESIGN section 3); it adds 0 to both sums of oIoU.
"""

from __future__ import annotations

from typing import Sequence

import torch

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_and_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample pixel counts of ``pred & target`` and ``pred | target``.

    Args:
        pred, target: ``(N, H, W)`` (or ``(N, *S)``) boolean masks.

    Returns:
        ``(intersection, union)``, each ``(N,)`` int64.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    return (pred & target).sum(1), (pred | target).sum(1)


def sample_iou(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """``I / U`` per sample as float64, 1.0 where both masks are empty (U = 0)."""
    intersection, union = intersection.double(), union.double()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


class ReferringMetrics:
    """Accumulates counts over batches; ``compute()`` gives oIoU, mIoU and prec@X."""

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> None:
        self.thresholds = tuple(thresholds)
        self.intersections: list[torch.Tensor] = []
        self.unions: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of ``(N, H, W)`` boolean masks."""
        intersection, union = intersection_and_union(pred, target)
        self.intersections.append(intersection.cpu())
        self.unions.append(union.cpu())

    def compute(self) -> dict[str, float]:
        if not self.intersections:
            raise ValueError("ReferringMetrics.compute() before any update()")
        return referring_metrics_from_counts(torch.cat(self.intersections), torch.cat(self.unions), self.thresholds)


def referring_metrics_from_counts(
    intersection: torch.Tensor, union: torch.Tensor, thresholds: Sequence[float] = PRECISION_THRESHOLDS
) -> dict[str, float]:
    """``{"oIoU", "mIoU", "prec@0.5", ..., "num_samples"}`` from per-sample counts ``(N,)``."""
    total_union = union.sum().item()
    overall = intersection.sum().item() / total_union if total_union > 0 else 1.0
    ious = sample_iou(intersection, union)
    metrics = {"oIoU": float(overall), "mIoU": float(ious.mean().item())}
    for threshold in thresholds:
        metrics[f"prec@{threshold:g}"] = float((ious > threshold).double().mean().item())
    metrics["num_samples"] = float(len(ious))
    return metrics


def referring_metrics(
    pred: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float] = PRECISION_THRESHOLDS
) -> dict[str, float]:
    """oIoU, mIoU and prec@X of ``(N, H, W)`` boolean masks in one call."""
    return referring_metrics_from_counts(*intersection_and_union(pred, target), thresholds)
