"""Building blocks shared by medtune's decoders and segmentation networks, for any ``spatial_dims``.

Written once for 2D and 3D in MONAI's style: ``spatial_dims`` picks ``Conv2d`` or
``Conv3d``, ``BatchNorm2d`` or ``BatchNorm3d``, bilinear or trilinear resizing.

- :func:`conv_layer`, :func:`conv_transpose_layer`, :func:`norm_layer` (``batch``,
  ``instance``, ``group`` with 8 groups where the width allows), :func:`resize`.
- :class:`ConvNormAct`: conv -> norm -> ReLU.
- :class:`ResidualBlock`: the pre-activation residual block of the BraTS 3D U-Nets
  (TransBTS, CGA U-Net): ``x + conv(act(norm(conv(act(norm(x))))))``.
- :class:`UpConcat`: the decoder step of the same networks: 1x1 conv to the skip's
  width, transposed conv x2, concatenate the skip, 1x1 conv.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.errors import ConfigError

NORMS = ("batch", "instance", "group")


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``/``Conv2d``/``Conv3d``."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def conv_transpose_layer(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


def norm_layer(spatial_dims: int, norm: str, channels: int) -> nn.Module:
    """``batch``, ``instance`` (affine) or ``group`` normalisation of ``channels``
    (GroupNorm with gcd(channels, 8) groups: 8 for the usual widths)."""
    if norm == "batch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if norm == "instance":
        return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](
            channels, affine=True
        )
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got '{norm}'")


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Linear resize of ``(B, C, *S)`` to ``size`` (bilinear in 2D, trilinear in 3D)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=align_corners)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> norm -> ReLU; ``(B, C_in, *S) -> (B, C_out, *S/stride)``."""

    def __init__(
        self, spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, norm: str = "batch", stride: int = 1
    ):
        super().__init__(
            conv_layer(spatial_dims)(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            norm_layer(spatial_dims, norm, out_ch),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(norm(conv(relu(norm(x))))))``,
    3x3(x3) convs, same width; ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, spatial_dims: int, channels: int, norm: str = "group") -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.norm1 = norm_layer(spatial_dims, norm, channels)
        self.conv1 = conv(channels, channels, 3, padding=1)
        self.norm2 = norm_layer(spatial_dims, norm, channels)
        self.conv2 = conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(y)))


class UpConcat(nn.Module):
    """One decoder step: ``x (B, C_in, *S)`` and ``skip (B, C_out, *2S)`` ->
    ``(B, C_out, *2S)``: 1x1 conv to ``C_out``, transposed conv x2, concatenation with
    the skip, 1x1 conv back to ``C_out``."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.reduce = conv(in_ch, out_ch, 1)
        self.up = conv_transpose_layer(spatial_dims)(out_ch, out_ch, kernel_size=2, stride=2)
        self.fuse = conv(2 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(self.reduce(x))
        if up.shape[2:] != skip.shape[2:]:  # an odd-sized skip: the x2 map is one larger
            up = up[(..., *(slice(0, s) for s in skip.shape[2:]))]
        return self.fuse(torch.cat([skip, up], dim=1))


__all__ = [
    "ConvNormAct", "NORMS", "ResidualBlock", "UpConcat", "conv_layer", "conv_transpose_layer", "norm_layer", "resize",
]
