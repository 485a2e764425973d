"""Counting parameters and FLOPs, the one way every medtune report does it.

- :func:`count_parameters`: ``(total, trainable)`` parameter elements, a tensor shared
  by several modules counted once.
- :func:`flop_counter`: ``torch.utils.flop_counter.FlopCounterMode`` with a corrected
  formula for the backward of grouped convolutions (torch's overcounts the weight
  gradient of a depthwise convolution by its channel count). FlopCounterMode counts
  matmuls, convolutions and attention (a multiply-add = 2 FLOPs); FFTs, norms and
  activations are not counted.
- :func:`count_flops`: the FLOPs of one call, optionally with its backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` element counts of ``model``'s parameters; shared ones count once."""
    total = trainable = 0
    for param in model.parameters():  # parameters() yields a shared tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return total, trainable


def _conv_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
    _output_padding, _groups, output_mask, out_shape=None, **kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward``, grouped convolutions included.

    Each requested gradient (input, weight) touches every (output position, weight
    element) pair once, so each costs what the forward convolution costs. torch's own
    formula ignores ``groups`` for the weight gradient and overcounts depthwise
    convolutions (the Med-Adapter's, ST-Adapter's) by a factor of the channel count.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """A ``FlopCounterMode`` with medtune's corrected convolution-backward formula."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}
    )


def count_flops(fn: Callable[[], Any], *, backward: bool = False) -> int:
    """FLOPs of ``fn()``; with ``backward``, ``fn`` returns a scalar loss whose backward
    is counted too (a training step). Without it, ``fn`` runs under ``no_grad``."""
    counter = flop_counter()
    if backward:
        with counter:
            fn().backward()
    else:
        with torch.no_grad(), counter:
            fn()
    return int(counter.get_total_flops())


def matmul_peak_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                       seconds: float = 2.0) -> float:
    """This machine's measured GFLOP/s of square ``size`` matmuls (best of repeated timings
    over ``seconds``): the peak that benchmarks report achieved FLOP/s against.
    ``size`` defaults to 1024 on a CPU, 8192 on a GPU."""
    import time

    size = size or (1024 if str(device).startswith("cpu") else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a @ b  # warm-up
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


__all__ = ["count_flops", "count_parameters", "flop_counter", "matmul_peak_gflops"]
