"""Deformable convolution (DCNv1, Dai et al. 2017) in 2D and 3D, in plain PyTorch.

A deformable convolution samples its input not on the fixed kernel grid but at learned
positions: output position ``p`` reads, for each kernel point ``p_k``, the input at
``p + p_k + dp_k(p)``, the offsets ``dp_k(p)`` predicted per position by an ordinary
convolution. Fractional positions are read by linear interpolation (bilinear in 2D,
trilinear in 3D, through ``grid_sample``); positions outside the input read zero, as
a convolution's zero padding does. torchvision's ``deform_conv2d`` is 2D only; this
serves any ``spatial_dims`` and, in 2D, equals it (tests compare the two).

    layer = DeformConv(3, in_ch=16, out_ch=16)        # offsets start at zero:
    y = layer(x)                                      # x (B, 16, H, W, D) -> (B, 16, H, W, D)

Offsets are laid out as torchvision's: ``(B, K * n, *S_out)``, kernel point major,
spatial axis minor, axes in the tensor's order (``(dy, dx)`` pairs in 2D). Stride 1.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.blocks import conv_layer


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


def kernel_points(kernel_size: Sequence[int], dilation: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """``(K, n)`` displacement of each kernel point from the output position, in the order
    of ``weight.flatten(2)`` (row-major over the kernel axes)."""
    axes = [torch.arange(k) * d - p for k, d, p in zip(kernel_size, dilation, padding)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes)).float()


def deform_conv(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Deformable convolution, stride 1.

    Args:
        x: ``(B, C_in, *S)``, 2 or 3 spatial axes.
        offset: ``(B, K * n, *S_out)`` offsets in voxels (``K`` kernel points, ``n`` axes).
        weight: ``(C_out, C_in, *kernel)``.
        bias: ``(C_out,)`` or None.
    Returns:
        ``(B, C_out, *S_out)`` with ``S_out = S + 2 * padding - dilation * (kernel - 1)``.
    """
    n = x.dim() - 2
    batch, in_ch, *size = x.shape
    kernel = tuple(weight.shape[2:])
    padding, dilation = _tuple(padding, n), _tuple(dilation, n)
    out_size = [s + 2 * p - d * (k - 1) for s, p, d, k in zip(size, padding, dilation, kernel)]
    points = kernel_points(kernel, dilation, padding).to(x.device, x.dtype)  # (K, n)
    count = points.shape[0]
    if offset.shape != (batch, count * n, *out_size):
        raise ValueError(f"offset has shape {tuple(offset.shape)}; expected {(batch, count * n, *out_size)}")
    grids = torch.meshgrid(*(torch.arange(s, device=x.device, dtype=x.dtype) for s in out_size), indexing="ij")
    base = torch.stack(grids, dim=-1)  # (*S_out, n)
    shifts = offset.reshape(batch, count, n, *out_size).movedim(2, -1)  # (B, K, *S_out, n)
    where = base + points.reshape(count, *([1] * n), n) + shifts  # (B, K, *S_out, n) input positions
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer edges of the
    # first and last voxel, so voxel i sits at (2i + 1) / size - 1; its last axis is (x, y, z)
    # = the tensor's axes reversed.
    extent = torch.tensor(size, device=x.device, dtype=x.dtype)
    grid = ((2 * where + 1) / extent - 1).flip(-1)
    grid = grid.reshape(batch, count * out_size[0], *out_size[1:], n)  # kernel points stacked on axis 0
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.reshape(batch, in_ch, count, *out_size)  # (B, C_in, K, *S_out)
    out = torch.einsum("bck...,ock->bo...", sampled, weight.reshape(weight.shape[0], in_ch, count))
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * n))
    return out


class DeformConv(nn.Module):
    """Deformable convolution layer: offsets from a plain convolution of the input,
    zero-initialised, so the layer starts as the ordinary convolution of its weights.

    Args:
        spatial_dims: 2 or 3.
        in_ch, out_ch: channels.
        kernel_size: odd kernel side (default 3); ``padding = dilation * (kernel_size // 2)``
            keeps the size.
        dilation: kernel dilation.
        bias: add a learned bias.
    ``(B, in_ch, *S) -> (B, out_ch, *S)``.
    """

    def __init__(
        self, spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        template = conv(in_ch, out_ch, kernel_size, bias=bias)  # PyTorch's default initialisation
        self.weight = nn.Parameter(template.weight.detach().clone())
        self.bias = nn.Parameter(template.bias.detach().clone()) if bias else None
        self.padding = dilation * (kernel_size // 2)
        self.dilation = dilation
        points = kernel_size**spatial_dims
        self.offset = conv(in_ch, points * spatial_dims, kernel_size, padding=self.padding, dilation=dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deform_conv(x, self.offset(x), self.weight, self.bias, self.padding, self.dilation)


__all__ = ["DeformConv", "deform_conv", "kernel_points"]
