"""Segmentation metrics: Dice and HD95 per region, under BraTS's or nnU-Net's rules.

MONAI computes the numbers (``compute_dice``, ``compute_hausdorff_distance``); this
module applies a dataset's conventions for empty regions on top. ``rules="brats"`` (the
official BraTS conventions, for BraTS data only):

- Dice: ground truth and prediction both empty -> 1; only one empty -> 0.
- HD95 (mm, using the voxel spacing): both empty -> 0; only one empty ->
  373.12866 (the diagonal of the BraTS volume in mm).

``rules="nnunet"`` (every other dataset, as nnU-Net's evaluation):

- Dice: both empty -> NaN (nothing to score), only one empty -> 0.
- HD95: either one empty -> NaN (a distance to nothing is undefined; BraTS's volume
  diagonal means nothing for another dataset's field of view).

NaN scores are left out of the means (:func:`mean_scores`), which count them.
Regions are unions of label values, e.g. BraTS WT = {1, 2, 4}, TC = {1, 4}, ET = {4}.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

# Region name -> label values it covers (BraTS 2019-2021 numbering).
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)}
# HD95 when exactly one of prediction / ground truth is empty (BraTS volume diagonal, mm).
HD95_ONE_EMPTY = 373.12866


def region_masks(
    labels: np.ndarray | torch.Tensor, regions: Mapping[str, Sequence[int]]
) -> torch.Tensor:
    """Label map ``(*S)`` of dataset values -> bool masks ``(R, *S)``, one per region."""
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    masks = [torch.isin(labels, torch.tensor(list(values), dtype=labels.dtype)) for values in regions.values()]
    return torch.stack(masks)


RULES = ("brats", "nnunet")


def dice_scores(pred: torch.Tensor, target: torch.Tensor, rules: str = "brats") -> torch.Tensor:
    """Dice of bool masks ``(R, *S)`` -> ``(R,)``; one empty = 0, both empty = 1 (BraTS)
    or NaN (nnU-Net)."""
    pred_b, target_b = pred.bool(), target.bool()
    # MONAI's Dice with ignore_empty=False already scores "GT empty" as 1 if the
    # prediction is empty too and 0 otherwise; the BraTS rules are then exact.
    dice = compute_dice(
        pred_b[None].float(), target_b[None].float(), include_background=True, ignore_empty=False
    )[0]
    pred_empty = ~pred_b.flatten(1).any(1)
    target_empty = ~target_b.flatten(1).any(1)
    both_empty = torch.ones_like(dice) if rules == "brats" else torch.full_like(dice, float("nan"))
    dice = torch.where(pred_empty & target_empty, both_empty, dice)
    dice = torch.where(pred_empty ^ target_empty, torch.zeros_like(dice), dice)
    return dice.double()


def hd95_scores(
    pred: torch.Tensor, target: torch.Tensor, spacing: Sequence[float] | None = None, rules: str = "brats"
) -> torch.Tensor:
    """HD95 in mm of bool masks ``(R, *S)`` -> ``(R,)``.

    ``spacing`` is the voxel size per spatial axis (mm). BraTS: both empty = 0, only one
    empty = :data:`HD95_ONE_EMPTY`; nnU-Net: either empty = NaN.
    """
    pred_b, target_b = pred.bool(), target.bool()
    pred_empty = ~pred_b.flatten(1).any(1)
    target_empty = ~target_b.flatten(1).any(1)
    result = torch.zeros(pred_b.shape[0], dtype=torch.float64)
    if rules == "brats":
        result[pred_empty ^ target_empty] = HD95_ONE_EMPTY
    else:
        result[pred_empty | target_empty] = float("nan")
    both = torch.nonzero(~pred_empty & ~target_empty).flatten()
    if len(both):
        spacing_list = None if spacing is None else [float(s) for s in spacing]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            distance = compute_hausdorff_distance(
                pred_b[both][None].float(),
                target_b[both][None].float(),
                include_background=True,
                percentile=95,
                spacing=spacing_list,
            )[0]
        result[both] = distance.double()
    return result


def evaluate_case(
    pred_labels: np.ndarray | torch.Tensor,
    true_labels: np.ndarray | torch.Tensor,
    regions: Mapping[str, Sequence[int]] = BRATS_REGIONS,
    spacing: Sequence[float] | None = None,
    with_hd95: bool = True,
    rules: str = "brats",
) -> dict[str, float]:
    """Scores of one case: ``{"Dice_ET": .., "HD95_ET": .., ...}``.

    ``pred_labels`` and ``true_labels`` are label maps ``(*S)`` in the dataset's values
    (for BraTS 0, 1, 2, 4) and must have the same shape; ``rules``: ``brats`` or ``nnunet``
    (empty regions, see the module docstring).
    """
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    pred_t = torch.as_tensor(np.asarray(pred_labels)) if not isinstance(pred_labels, torch.Tensor) else pred_labels
    true_t = torch.as_tensor(np.asarray(true_labels)) if not isinstance(true_labels, torch.Tensor) else true_labels
    if tuple(pred_t.shape) != tuple(true_t.shape):
        raise ValueError(f"prediction shape {tuple(pred_t.shape)} != ground truth shape {tuple(true_t.shape)}")
    pred_masks = region_masks(pred_t.long(), regions)
    true_masks = region_masks(true_t.long(), regions)
    scores: dict[str, float] = {}
    dice = dice_scores(pred_masks, true_masks, rules)
    for name, value in zip(regions, dice.tolist()):
        scores[f"Dice_{name}"] = value
    if with_hd95:
        hd = hd95_scores(pred_masks, true_masks, spacing, rules)
        for name, value in zip(regions, hd.tolist()):
            scores[f"HD95_{name}"] = value
    return scores


def mean_scores(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each score over the cases where it is defined (NaN left out, as nnU-Net);
    NaN when no case defines it. Under the BraTS rules no score is NaN."""
    if not per_case:
        return {}
    means = {}
    for key in per_case[0]:
        values = np.asarray([case[key] for case in per_case], dtype=np.float64)
        means[key] = float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")
    return means


def nan_counts(per_case: Sequence[Mapping[str, float]]) -> dict[str, int]:
    """How many cases have each score undefined (NaN: an empty region on one or both sides)."""
    if not per_case:
        return {}
    return {key: int(sum(np.isnan(case[key]) for case in per_case)) for key in per_case[0]}

