"""BraTS Dice / HD95 against hand-worked tiny volumes and MONAI's own metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from medtune.finetune.segmentation.metrics import (
    BRATS_REGIONS,
    HD95_ONE_EMPTY,
    dice_scores,
    evaluate_case,
    hd95_scores,
    mean_scores,
    region_masks,
)


def test_region_masks_follow_brats_unions():
    labels = np.array([[[0, 1, 2, 4]]], dtype=np.uint8)  # (1, 1, 4)
    masks = region_masks(labels, BRATS_REGIONS)
    assert masks.shape == (3, 1, 1, 4)
    assert masks[0].flatten().tolist() == [False, False, False, True]  # ET = {4}
    assert masks[1].flatten().tolist() == [False, True, False, True]  # TC = {1, 4}
    assert masks[2].flatten().tolist() == [False, True, True, True]  # WT = {1, 2, 4}


def test_hand_worked_dice_and_hd95():
    true = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros((4, 4, 4), dtype=np.uint8)
    true[0, 0, 0] = 4
    true[0, 0, 1] = 4  # ET: 2 voxels
    pred[0, 0, 0] = 4  # ET: 1 voxel, overlapping -> Dice 2*1/(2+1)
    true[3, 3, 3] = 2  # edema only in GT, far away
    pred[3, 3, 0] = 2  # edema only in prediction
    scores = evaluate_case(pred, true, spacing=(1.0, 1.0, 2.0))
    assert scores["Dice_ET"] == pytest.approx(2 / 3)
    assert scores["Dice_TC"] == pytest.approx(2 / 3)
    # WT: GT {(0,0,0),(0,0,1),(3,3,3)}, pred {(0,0,0),(3,3,0)} -> 2*1/(3+2)
    assert scores["Dice_WT"] == pytest.approx(0.4)
    # HD95 = max of the two directed 95th percentiles (linear interpolation, as
    # np.percentile / medpy). ET: GT->pred distances [0, 2 mm] -> 0.95 * 2 = 1.9;
    # pred->GT [0] -> 0.
    assert scores["HD95_ET"] == pytest.approx(1.9, abs=1e-5)
    # WT: GT->pred: (0,0,0) 0, (0,0,1) 2, (3,3,3) -> (3,3,0) 6 -> [0, 2, 6] -> 2 + 0.9 * 4
    # = 5.6; pred->GT: (3,3,0) -> (0,0,1) sqrt(9+9+4) -> [0, 4.69] -> 4.46; max = 5.6.
    assert scores["HD95_WT"] == pytest.approx(5.6, abs=1e-5)


def test_empty_region_rules():
    empty = torch.zeros(1, 3, 3, 3, dtype=torch.bool)
    full = empty.clone()
    full[0, 1, 1, 1] = True
    assert dice_scores(empty, empty).tolist() == [1.0]
    assert dice_scores(full, empty).tolist() == [0.0]
    assert dice_scores(empty, full).tolist() == [0.0]
    assert hd95_scores(empty, empty).tolist() == [0.0]
    assert hd95_scores(full, empty).tolist() == [HD95_ONE_EMPTY]
    assert hd95_scores(empty, full, spacing=(1, 1, 1)).tolist() == [HD95_ONE_EMPTY]
    # A case without any tumour predicted as empty scores perfectly.
    zeros = np.zeros((3, 3, 3), dtype=np.uint8)
    scores = evaluate_case(zeros, zeros)
    assert all(scores[f"Dice_{r}"] == 1.0 for r in BRATS_REGIONS)
    assert all(scores[f"HD95_{r}"] == 0.0 for r in BRATS_REGIONS)


def test_dice_agrees_with_monai_dice_metric_on_nonempty_regions():
    rng = np.random.default_rng(0)
    values = np.array([0, 1, 2, 4], dtype=np.uint8)
    pred = values[rng.integers(0, 4, size=(8, 8, 6))]
    true = values[rng.integers(0, 4, size=(8, 8, 6))]
    ours = dice_scores(region_masks(pred, BRATS_REGIONS), region_masks(true, BRATS_REGIONS))
    metric = DiceMetric(include_background=True, reduction="none")
    metric(
        region_masks(pred, BRATS_REGIONS)[None].float(), region_masks(true, BRATS_REGIONS)[None].float()
    )
    reference = metric.aggregate()[0].double()
    assert torch.allclose(ours, reference)
    assert 0.0 < ours.min() < ours.max() < 1.0


def test_mean_scores_and_shape_check():
    per_case = [{"Dice_ET": 1.0, "HD95_ET": 0.0}, {"Dice_ET": 0.5, "HD95_ET": 4.0}]
    assert mean_scores(per_case) == {"Dice_ET": 0.75, "HD95_ET": 2.0}
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
