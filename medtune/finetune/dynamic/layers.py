"""The math of dynamic inference (Med-DANet, Med-DANet V2), as small pure functions and layers.

- :func:`straight_through_choice`: Gumbel-softmax with a hard one-hot forward and the
  soft sample's gradient (``tau`` 1 as the official code); argmax in eval mode.
- :func:`quantize_weight`: symmetric per-tensor weight quantization with a
  straight-through round, ``q = round(w * (2^(k-1) - 1) / max|w|) * max|w| / (2^(k-1) - 1)``.
- :func:`crop_slices` / :func:`paste_probabilities`: a fixed-size crop taken at a
  normalised position ``(y, x)`` in ``[0, 1]`` (0: top/left edge, 1: bottom/right edge)
  with ``grid_sample``, and a crop's class probabilities pasted back on a background
  canvas; exact pixel copies at integer positions (prediction rounds them).
- :func:`image_gradient_stats`: the mean absolute Sobel gradient of each channel in
  each direction, what the V2 bit selectors read besides the feature std.
- :class:`BitSelector` / :func:`run_at_bits`: a stage of the segmenter whose conv
  weights run at the bit width a linear selector picks per slice.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medtune.errors import DataError

SKIP, CROP, WHOLE = "skip", "crop", "whole"  # the paths of Med-DANet V2 (V1's bank: "whole_w<width>")


def background_probabilities(n: int, k: int, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """What a skipped slice predicts: class 0 with probability 1, ``(n, k, H, W)``."""
    probs = like.new_zeros(n, k, *size)
    probs[:, 0] = 1.0
    return probs


def straight_through_choice(logits: torch.Tensor, tau: float = 1.0, sample: bool = True) -> torch.Tensor:
    """``logits (N, P)`` -> one-hot choices ``(N, P)``.

    ``sample``: a Gumbel-softmax sample at temperature ``tau``, one-hot in the forward
    pass, the soft sample's gradient in the backward pass (straight-through); otherwise
    the argmax (inference), one-hot without gradient.
    """
    if sample:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return _RoundStraightThrough.apply(x)


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor quantization to ``bits`` (straight-through round); 32 or more
    bits: ``weight`` unchanged. Each element moves by at most half a step, the step being
    ``max|w| / (2^(bits-1) - 1)``."""
    if bits >= 32:
        return weight
    levels = 2.0 ** (bits - 1) - 1.0
    scale = weight.detach().abs().amax().clamp_min(1e-12) / levels
    return round_straight_through(weight / scale) * scale


def _theta(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Affine matrices ``(N, 2, 3)`` of per-axis ``scale`` and ``shift`` ``(N, 2)`` in (y, x)
    order (``affine_grid`` wants x first)."""
    theta = torch.zeros(shift.shape[0], 2, 3, dtype=shift.dtype, device=shift.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale[:, 1], scale[:, 0]
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 1], shift[:, 0]
    return theta


def crop_origin(position: torch.Tensor, size: Sequence[int], crop: int) -> torch.Tensor:
    """Top-left pixel ``(N, 2)`` (float, y x) of a ``crop``-sided crop at normalised
    ``position (N, 2)`` in a slice of ``size (H, W)``: ``position * (size - crop)``."""
    room = torch.tensor([size[0] - crop, size[1] - crop], dtype=position.dtype, device=position.device)
    return position * room


def check_crop(size: Sequence[int], crop: int, where: str = "slice") -> None:
    if crop > min(size):
        raise DataError(f"{where} of {size[0]} x {size[1]} px is smaller than the {crop} px crop")


def crop_slices(x: torch.Tensor, position: torch.Tensor, crop: int) -> torch.Tensor:
    """``x (N, C, H, W)``, ``position (N, 2)`` in ``[0, 1]`` -> crops ``(N, C, crop, crop)``
    (bilinear ``grid_sample``; differentiable in ``position``; an exact copy of the pixels
    when the origin is integral)."""
    size = x.shape[-2:]
    check_crop(size, crop)
    origin = crop_origin(position, size, crop)
    extent = torch.tensor(size, dtype=x.dtype, device=x.device)
    scale = (crop / extent).expand(x.shape[0], 2)
    shift = (2 * origin + crop) / extent - 1  # align_corners=False: pixel centres at (2i + 1) / H - 1
    grid = F.affine_grid(_theta(scale, shift.to(x.dtype)), [x.shape[0], x.shape[1], crop, crop], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def paste_probabilities(crop_probs: torch.Tensor, position: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class probabilities of crops ``(N, K, c, c)`` at ``position (N, 2)`` -> ``(N, K, H, W)``
    on a canvas of ``size``: the crop's probabilities inside it, background (class 0,
    probability 1) outside; the inverse of :func:`crop_slices`."""
    n, k, crop = crop_probs.shape[0], crop_probs.shape[1], crop_probs.shape[-1]
    check_crop(size, crop)
    origin = crop_origin(position, size, crop)
    extent = torch.tensor(size, dtype=crop_probs.dtype, device=crop_probs.device)
    scale = (extent / crop).expand(n, 2)
    shift = (extent - 2 * origin - crop) / crop  # canvas pixel i reads crop pixel i - origin
    grid = F.affine_grid(_theta(scale, shift.to(crop_probs.dtype)), [n, k + 1, *size], align_corners=False)
    ones = torch.ones_like(crop_probs[:, :1])
    pasted = F.grid_sample(torch.cat([crop_probs, ones], 1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    probs, inside = pasted[:, :k], pasted[:, k:]
    background = torch.zeros_like(probs)
    background[:, 0] = 1.0
    return probs + (1 - inside) * background


def image_gradient_stats(image: torch.Tensor) -> torch.Tensor:
    """``(N, M, H, W)`` -> ``(N, 2M)``: the mean absolute Sobel derivative of every channel
    along y and along x (normalised Sobel, as kornia's ``spatial_gradient``)."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=image.device) / 8.0
    kernels = torch.stack([sobel.t(), sobel])[:, None].to(image.dtype)  # (2, 1, 3, 3): d/dy, d/dx
    n, m = image.shape[:2]
    padded = F.pad(image.reshape(n * m, 1, *image.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels)  # (N*M, 2, H, W)
    return grads.abs().mean((-2, -1)).reshape(n, 2 * m)


class BitSelector(nn.Module):
    """Picks a weight bit width per slice from ``bits`` before one encoder stage (V2).

    A linear layer reads the image's gradient statistics ``(N, 2M)`` and the stage
    input's per-channel std ``(N, C)``; initialised as the official selector (weights 1,
    bias 0 except the last option's 1: every slice starts at the widest bit width).
    ``forward -> (choice (N, P) one-hot, straight-through on the softmax; bits (N,))``.
    """

    def __init__(self, channels: int, image_channels: int, bits: Sequence[int]) -> None:
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        self.linear = nn.Linear(channels + 2 * image_channels, len(self.bits))
        nn.init.ones_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        with torch.no_grad():
            self.linear.bias[-1] = 1.0

    def forward(self, features: torch.Tensor, gradient_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std = features.detach().flatten(2).std(-1)  # (N, C)
        logits = self.linear(torch.cat([gradient_stats, std], 1))
        soft = logits.softmax(-1)
        hard = F.one_hot(soft.argmax(-1), len(self.bits)).to(soft.dtype)
        choice = hard - soft.detach() + soft  # hard forward, the softmax's gradient
        bits = choice @ torch.tensor(self.bits, dtype=soft.dtype, device=soft.device)
        return choice, bits


def quantized_parameters(module: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """``module``'s conv/linear weights (parameters named ``*weight`` with 2+ dims) at ``bits``."""
    return {name: quantize_weight(p, bits) for name, p in module.named_parameters()
            if name.endswith("weight") and p.ndim >= 2}


def run_at_bits(stage: nn.Module, x: torch.Tensor, choice: torch.Tensor | None, bits: Sequence[int],
                mix: bool = True):
    """Run ``stage`` on slices ``x (N, ...)`` with its weights at each slice's bit width.

    ``choice (N, P)``: one-hot over ``bits`` (None: full precision). ``mix`` (training):
    the stage runs at every width and the outputs are mixed by ``choice`` (straight-through:
    the selector also gets the segmentation loss's gradient); otherwise (eval) each slice
    runs at its own width only, slices grouped by width. Outputs may be a tensor or a
    tuple (or list) of tensors, ``(N, ...)`` each; several come back as a tuple.
    """
    def at(inp: torch.Tensor, width: int):
        if width >= 32:
            return stage(inp)
        return functional_call(stage, quantized_parameters(stage, width), (inp,), strict=False)

    if choice is None or not bits:
        return stage(x)
    if mix:
        return _mix([at(x, b) for b in bits], choice)
    picked = choice.argmax(-1)
    parts, order = [], []
    for index, width in enumerate(bits):
        rows = torch.nonzero(picked == index).flatten()
        if rows.numel():
            parts.append(at(x[rows], width))
            order.append(rows)
    if not parts:  # no slices
        return at(x, bits[-1])
    if len(parts) == 1:
        return parts[0]
    inverse = torch.argsort(torch.cat(order))
    return _apply(lambda *ts: torch.cat(ts)[inverse], parts)


def _apply(fn, parts):
    if isinstance(parts[0], (tuple, list)):
        return tuple(fn(*items) for items in zip(*parts))
    return fn(*parts)


def _mix(outputs, choice: torch.Tensor):
    """``sum_p choice[:, p] * outputs[p]`` for tensors or tuples of tensors ``(N, ...)``."""

    def mix(*ts: torch.Tensor) -> torch.Tensor:
        weights = [choice[:, p].reshape(-1, *([1] * (t.ndim - 1))) for p, t in enumerate(ts)]
        return sum(w * t for w, t in zip(weights, ts))

    return _apply(mix, outputs)


__all__ = [
    "CROP", "SKIP", "WHOLE", "BitSelector", "background_probabilities", "check_crop", "crop_origin", "crop_slices",
    "image_gradient_stats", "paste_probabilities", "quantize_weight", "quantized_parameters", "round_straight_through",
    "run_at_bits", "straight_through_choice",
]
