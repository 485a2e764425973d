"""Dynamic prediction of slices and volumes, with the FLOPs each slice's choice spent.

::

    result = predict_slices(model, slices, count=True)   # (N, M, H, W) at the training size
    result.probabilities                                  # (N, K, H, W)
    result.choices, result.bits, result.origins           # per slice: path index, bits per stage, crop origin
    result.decision_flops, result.path_flops              # per slice, counted (torch.utils.flop_counter)
    result.cost_model_flops                               # per slice: quantized stages at bits / 32

    volume = predict_volume(model, image, slice_fit="pad", count=True)   # image (M, h, w, d) prepared

Slices are grouped by their decided path and each group runs batched; the FLOPs a group
spent are counted while it runs and shared equally by its slices (every slice of a
group has the same shape and the same operations, so the share is exact). A skipped
slice runs nothing after the Decision Network: zero path FLOPs. A constant slice
(nothing but background after normalisation) is skipped without asking the Decision
Network: zero FLOPs. ``static=True`` runs the whole-slice path at full precision on
every slice instead (the static model the dynamic one is compared with).

Slices of another size than the training size are padded up (with zeros, to at least
the training size and a multiple of the segmenter's stride) or resized (bilinear) as
``slice_fit`` says, and their probabilities are cropped or resized back: never cropped
silently.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medtune.finetune.dynamic.layers import CROP, SKIP, WHOLE, background_probabilities, crop_origin

EMPTY = "empty"  # a constant slice: skipped without a decision


@dataclass
class SlicePrediction:
    """What :func:`predict_slices` returns; every per-slice field has ``N`` rows."""

    probabilities: torch.Tensor  # (N, K, H, W)
    choices: list[str]  # the path of each slice ("empty" for constant slices)
    bits: list[list[int] | None]  # bits per encoder stage (None: not quantized / no segmenter)
    origins: list[list[int] | None]  # crop top-left (y, x) on the fitted slice (crop path only)
    decision_flops: list[int] = field(default_factory=list)  # counted, per slice
    path_flops: list[int] = field(default_factory=list)  # counted, per slice
    cost_model_flops: list[float] = field(default_factory=list)  # per slice

    @property
    def flops(self) -> list[int]:
        return [d + p for d, p in zip(self.decision_flops, self.path_flops)]


@contextlib.contextmanager
def _counting(enabled: bool):
    from medtune.checkpoints.counting import flop_counter

    if not enabled:
        yield None
        return
    with flop_counter() as counter:
        yield counter


def _shares(counter, n: int) -> list[int]:
    """A group's counted FLOPs, shared by its ``n`` slices (exact: they all ran the same ops)."""
    if counter is None or n == 0:
        return [0] * n
    total = int(counter.get_total_flops())
    share, remainder = divmod(total, n)
    if remainder:  # the ops of a group are linear in its batch; a remainder means they were not
        raise RuntimeError(f"{total} FLOPs do not split evenly over {n} slices")
    return [share] * n


@torch.no_grad()
def predict_slices(model, slices: torch.Tensor, *, count: bool = False, static: bool = False) -> SlicePrediction:
    """Decide and segment slices ``(N, M, H, W)`` (``H, W`` multiples of the segmenter's
    stride, at least the crop size); see the module docstring."""
    n = slices.shape[0]
    k = model.num_classes
    size = tuple(slices.shape[-2:])
    probs = background_probabilities(n, k, size, slices)
    choices: list[str] = [SKIP] * n
    bits_out: list[list[int] | None] = [None] * n
    origins: list[list[int] | None] = [None] * n
    decision_flops, path_flops, cost_flops = [0] * n, [0] * n, [0.0] * n

    flat = slices.flatten(1)
    constant = (flat.amax(1) - flat.amin(1)) <= 0  # nothing but background: no decision needed
    live = torch.nonzero(~constant).flatten()
    for i in torch.nonzero(constant).flatten().tolist():
        choices[i] = EMPTY
    if static:
        static_path = WHOLE if WHOLE in model.paths else model.paths[-1]
        decided = torch.full((n,), model.paths.index(static_path), dtype=torch.long, device=slices.device)
        live = torch.arange(n, device=slices.device)
        choices = [static_path] * n
    elif live.numel():
        with _counting(count) as counter:
            decided_live = model.decide(slices[live])
        for i, share in zip(live.tolist(), _shares(counter, live.numel())):
            decision_flops[i] = share
        decided = torch.zeros(n, dtype=torch.long, device=slices.device)
        decided[live] = decided_live
    else:
        decided = torch.zeros(n, dtype=torch.long, device=slices.device)

    live_mask = torch.zeros(n, dtype=torch.bool, device=slices.device)
    live_mask[live] = True
    quantize = model.quantized() and not static
    for p, path in enumerate(model.paths):
        rows = torch.nonzero(live_mask & (decided == p)).flatten()
        if path == SKIP or rows.numel() == 0:
            for i in rows.tolist():
                choices[i] = path
            continue
        x = slices[rows]
        with _counting(count) as counter:
            group_probs, bits, origin = _run_path(model, path, x, quantize)
        probs[rows] = group_probs.to(probs.dtype)
        model_flops = model.cost_model_flops(path, bits, size).expand(rows.numel()).tolist()
        for j, (i, share) in enumerate(zip(rows.tolist(), _shares(counter, rows.numel()))):
            choices[i], path_flops[i], cost_flops[i] = path, share, float(model_flops[j])
            bits_out[i] = [int(b) for b in bits[j].round().tolist()] if bits is not None else None
            origins[i] = [int(v) for v in origin[j].tolist()] if origin is not None else None
    return SlicePrediction(probs, choices, bits_out, origins, decision_flops, path_flops, cost_flops)


def _run_path(model, path: str, x: torch.Tensor, quantize: bool):
    """Eval-mode path on slices ``x``: crops at whole pixels (an exact copy), pasted back."""
    if path != CROP:
        logits, bits = model.path_logits(path, x, quantize)
        return logits.softmax(1), bits, None
    crop = model.crop_size
    position = model.crop_position(x)
    origin = crop_origin(position, x.shape[-2:], crop).round().long()  # (N, 2) whole pixels
    rows = origin[:, 0, None] + torch.arange(crop, device=x.device)  # (N, c)
    cols = origin[:, 1, None] + torch.arange(crop, device=x.device)
    index = torch.arange(x.shape[0], device=x.device)[:, None, None]
    crops = x.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    logits, bits = model.path_logits(path, crops.contiguous(), quantize)
    canvas = background_probabilities(x.shape[0], logits.shape[1], x.shape[-2:], x)
    for j in range(x.shape[0]):
        y0, x0 = origin[j].tolist()
        canvas[j, :, y0:y0 + crop, x0:x0 + crop] = logits[j].softmax(0)
    return canvas, bits, origin


# --------------------------------------------------------------------------- volumes


def fitted_size(size: Sequence[int], training: Sequence[int], stride: int, slice_fit: str) -> tuple[int, int]:
    """The size a slice of ``size`` is predicted at: ``resize``: the training size;
    ``pad``: at least the training size, rounded up to a multiple of ``stride``."""
    if slice_fit == "resize":
        return tuple(int(t) for t in training)  # type: ignore[return-value]
    return tuple(-(-max(int(s), int(t)) // stride) * stride for s, t in zip(size, training))  # type: ignore


def fit_slices(slices: torch.Tensor, target: Sequence[int], slice_fit: str) -> torch.Tensor:
    """``(N, M, h, w)`` -> ``(N, M, *target)``: zero-padded at the bottom/right, or resized."""
    h, w = slices.shape[-2:]
    if (h, w) == tuple(target):
        return slices
    if slice_fit == "resize":
        return F.interpolate(slices, size=tuple(target), mode="bilinear", align_corners=False)
    return F.pad(slices, (0, target[1] - w, 0, target[0] - h))


def unfit_probabilities(probs: torch.Tensor, size: Sequence[int], slice_fit: str) -> torch.Tensor:
    """Inverse of :func:`fit_slices` for probabilities ``(N, K, H', W') -> (N, K, h, w)``."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    if slice_fit == "resize":
        return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)
    return probs[..., : size[0], : size[1]]


@dataclass
class VolumePrediction:
    """A volume's probabilities ``(K, h, w, d)`` and each slice's record (``d`` of them)."""

    probabilities: torch.Tensor
    slices: SlicePrediction
    fitted_size: tuple[int, int]
    wall_s: float

    def totals(self) -> dict[str, float]:
        counted = sum(self.slices.flops)
        return {"flops_counted": counted, "decision_flops_counted": sum(self.slices.decision_flops),
                "path_flops_counted": sum(self.slices.path_flops),
                "cost_model_flops": sum(self.slices.cost_model_flops) + sum(self.slices.decision_flops),
                "wall_s": self.wall_s}


@torch.no_grad()
def predict_volume(model, image: torch.Tensor | np.ndarray, *, slice_fit: str = "pad", count: bool = False,
                   static: bool = False, batch: int = 64) -> VolumePrediction:
    """A prepared volume ``(M, h, w, d)`` (slices along the last axis) -> :class:`VolumePrediction`,
    ``batch`` slices at a time; the wall time covers the whole volume."""
    param = next(model.parameters())
    volume = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    volume = torch.nan_to_num(volume.to(device=param.device, dtype=torch.float32))
    size = tuple(volume.shape[1:3])
    stride = model.stride
    target = fitted_size(size, model.slice_size, stride, slice_fit)
    slices = volume.permute(3, 0, 1, 2)  # (d, M, h, w)
    model.cost_table(target)  # counted once per slice size, before the clock starts
    start = time.perf_counter()
    parts = [predict_slices(model, fit_slices(slices[i:i + batch], target, slice_fit), count=count, static=static)
             for i in range(0, slices.shape[0], batch)]
    wall = time.perf_counter() - start
    probs = torch.cat([unfit_probabilities(p.probabilities, size, slice_fit) for p in parts])  # (d, K, h, w)
    merged = SlicePrediction(
        probs, *([row for p in parts for row in getattr(p, name)] for name in
                 ("choices", "bits", "origins", "decision_flops", "path_flops", "cost_model_flops")),
    )
    return VolumePrediction(probs.permute(1, 2, 3, 0).cpu(), merged, target, wall)


__all__ = [
    "EMPTY", "SlicePrediction", "VolumePrediction", "fit_slices", "fitted_size", "predict_slices", "predict_volume",
    "unfit_probabilities",
]
