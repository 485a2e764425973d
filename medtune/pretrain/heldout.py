"""Losses of a pretraining objective on held-out samples, and each band against a zero prediction.

A falling training loss does not say that a band is learned: FreMAE's high band has a
small amplitude, and a prediction of low-amplitude noise scores about as well as
predicting zeros. So the pretraining run measures, on samples of cases it never trains
on, each band's loss next to that of a zero prediction (``high_ratio = loss_high /
zero_high``; near 1: nothing learned)::

    metrics = heldout_losses(objective, heldout_dataset, batch_size=16, seed=0)
    # {"loss", "loss_high", "loss_low", "zero_high", "zero_low", "high_ratio", "low_ratio",
    #  "high_ratio_no_encoder", "low_ratio_no_encoder", ...}

A learned band need not have trained the encoder: FreMAE's decoder also reads the masked
input at full resolution. ``*_ratio_no_encoder`` is the same decoder's ratio on the same
masked input with the encoder's stage maps zeroed; a band whose ratio does not rise
without the encoder was learned by the decoder alone.

Objectives without bands (MAE, SimMIM, MFM) report their own scalar logs only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, default_collate


def spread_subset(dataset: Dataset, count: int) -> Dataset:
    """At most ``count`` samples of ``dataset``, evenly spread over it (deterministic)."""
    total = len(dataset)
    if count >= total:
        return dataset
    return Subset(dataset, sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)}))


@torch.no_grad()
def heldout_losses(objective: nn.Module, dataset: Dataset, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Sample-weighted mean of every scalar the objective logs over ``dataset``, plus, for
    objectives with ``zero_prediction_losses`` (FreMAE), ``zero_high``, ``zero_low`` and
    the ratios ``high_ratio``, ``low_ratio`` of the means. An objective's ``heldout_logs``
    (FreMAE's adds ``loss_high_no_encoder``, ``loss_low_no_encoder``) replaces its forward
    here; those losses get ratios too (``high_ratio_no_encoder``, ``low_ratio_no_encoder``).

    The masks are drawn from ``seed`` (the global RNGs are left as they were), so every
    evaluation of a run sees the same masked inputs.
    """
    device = next(objective.parameters()).device
    devices = [device] if device.type == "cuda" else []
    step = getattr(objective, "heldout_logs", objective)
    zero_losses = getattr(objective, "zero_prediction_losses", None)
    sums: dict[str, float] = {}
    count = 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in default_collate(items).items()}
            logs = {k: float(v) for k, v in step(batch).items()}
            if callable(zero_losses):
                zero_high, zero_low = zero_losses(batch["image"])
                logs.update(zero_high=float(zero_high), zero_low=float(zero_low))
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value * len(items)
            count += len(items)
    metrics = {key: value / max(1, count) for key, value in sums.items()}
    for band in ("high", "low"):
        for suffix in ("", "_no_encoder"):
            if f"zero_{band}" in metrics and f"loss_{band}{suffix}" in metrics:
                metrics[f"{band}_ratio{suffix}"] = metrics[f"loss_{band}{suffix}"] / max(metrics[f"zero_{band}"], 1e-12)
    return metrics


def describe_heldout(metrics: dict[str, float], samples: int) -> str:
    """One line for the run's log: the held-out loss, and each band against a zero prediction."""
    text = f"held-out loss on {samples} samples: {metrics.get('loss', float('nan')):.4g}"
    for band in ("high", "low"):
        if f"{band}_ratio" in metrics:
            text += (f"; {band} band {metrics[f'loss_{band}']:.4g} vs zero prediction "
                     f"{metrics[f'zero_{band}']:.4g} (ratio {metrics[f'{band}_ratio']:.3f}")
            if f"{band}_ratio_no_encoder" in metrics:
                text += f", {metrics[f'{band}_ratio_no_encoder']:.3f} with the encoder's maps zeroed"
            text += ")"
    return text


__all__ = ["describe_heldout", "heldout_losses", "spread_subset"]
