"""Validation of a segmenter on held-out whole volumes (Dice per region, BraTS rules)."""

from __future__ import annotations

from typing import Any

import torch

from medtune import distributed
from medtune.finetune.segmentation.inference import sliding_window_probs
from medtune.finetune.segmentation.metrics import dice_scores


@torch.no_grad()
def validate_segmenter(model, val_set, label_spec, roi_size, cfg, processes: Any = None) -> dict[str, float]:
    """Mean Dice per region over held-out whole volumes (sliding window).

    ``val_set`` is a :class:`medtune.data.VolumeDataset` with labels (cropped volumes);
    ``cfg`` a :class:`ValidationConfig`. With several processes each one scores every
    ``num_processes``-th case and the scores are gathered, so no case is done twice and
    every process returns the single-process metrics.
    Returns ``{"Dice_<region>": .., "Dice_mean": ..}``.
    """
    count = len(val_set) if cfg.max_cases is None else min(cfg.max_cases, len(val_set))

    def score(indices: list[int]) -> list[tuple[int, list[float]]]:
        rows = []
        for index in indices:
            item = val_set[index]
            probs = sliding_window_probs(
                model, item["image"], roi_size, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
                tta=cfg.tta, mode=cfg.mode,
            )  # (K, h, w, d)
            pred_masks = label_spec.index_region_masks(probs.argmax(0))
            true_masks = label_spec.index_region_masks(item["label"])
            rows.append((index, dice_scores(pred_masks, true_masks).tolist()))
        return rows

    rows = distributed.split_gather(processes, count, score)
    scores = torch.tensor([row[1] for row in rows], dtype=torch.float64).mean(0).tolist()
    metrics = {f"Dice_{name}": value for name, value in zip(label_spec.region_names, scores)}
    metrics["Dice_mean"] = sum(scores) / len(scores)
    return metrics
