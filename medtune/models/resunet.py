"""The TransBTS-style residual U-Net (the CNN of TransBTS / Med-DANet without the
transformer), for any ``spatial_dims``, split into encoder stages.

::

    stem:    3x3 conv M -> w (+ channel dropout 0.2 while training, as the official InitConv)
    stage 1: 1 residual block (w),  then a stride-2 3x3 conv w -> 2w      skip 1 (w, S)
    stage 2: 2 residual blocks (2w), then stride-2 conv 2w -> 4w           skip 2 (2w, S/2)
    stage 3: 2 residual blocks (4w), then stride-2 conv 4w -> 8w           skip 3 (4w, S/4)
    stage 4: 4 residual blocks (8w)                                         bottom (8w, S/8)
    decoder: 3 x (UpConcat with the skip + residual block, but the last) -> (w, S)

:class:`ResidualUNet` returns the decoder's last map ``(B, w, *S)``; a head (one residual
block and a 1x1 conv, :class:`SegmentationHead`) turns it into logits. Med-DANet V2 puts
a bit selector before each of the 4 stages (:mod:`medtune.finetune.dynamic`), which is
why the stages are modules of their own: ``forward_stages`` lets a caller run each one
its own way. The input side must be a multiple of :attr:`ResidualUNet.stride` (8).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.blocks import ResidualBlock, UpConcat, conv_layer


class EncoderStage(nn.Module):
    """Residual blocks, then (but for the last stage) a stride-2 conv to the next width:
    ``x -> (skip, down)``, or ``x -> bottom`` for the last stage."""

    def __init__(self, spatial_dims: int, channels: int, blocks: int, out_channels: int | None, norm: str) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(spatial_dims, channels, norm) for _ in range(blocks)))
        conv = conv_layer(spatial_dims)
        self.down = conv(channels, out_channels, 3, stride=2, padding=1) if out_channels else None

    def forward(self, x: torch.Tensor):
        skip = self.blocks(x)
        return skip if self.down is None else (skip, self.down(skip))


class ResidualUNet(nn.Module):
    """Residual U-Net ``(B, M, *S) -> (B, width, *S)`` features (see the module docstring).

    Args:
        spatial_dims: 2 (slices) or 3 (volumes).
        in_chans: M input channels.
        width: w, the first stage's width (the official 16).
        blocks: residual blocks per stage (official ``(1, 2, 2, 4)``).
        norm: ``batch`` (official), ``instance`` or ``group``.
        dropout: channel dropout after the stem while training (official 0.2).
    """

    stride = 8

    def __init__(self, spatial_dims: int = 2, in_chans: int = 4, width: int = 16,
                 blocks: Sequence[int] = (1, 2, 2, 4), norm: str = "batch", dropout: float = 0.2) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.spatial_dims, self.in_chans, self.width, self.dropout = spatial_dims, in_chans, width, dropout
        self.norm = norm
        widths = [width * 2 ** i for i in range(len(blocks))]
        self.stride = 2 ** (len(blocks) - 1)
        self.stem = conv(in_chans, width, 3, padding=1, bias=False)
        self.stages = nn.ModuleList(
            EncoderStage(spatial_dims, widths[i], n, widths[i + 1] if i + 1 < len(blocks) else None, norm)
            for i, n in enumerate(blocks)
        )
        self.ups = nn.ModuleList(UpConcat(spatial_dims, widths[i + 1], widths[i]) for i in reversed(range(len(blocks) - 1)))
        # a residual block after every up step but the last (the official DeBlock3, DeBlock2)
        self.refine = nn.ModuleList(
            ResidualBlock(spatial_dims, widths[i], norm) if i > 0 else nn.Identity()
            for i in reversed(range(len(blocks) - 1))
        )
        self.stage_channels = tuple(widths)  # input width of each stage

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.dropout and self.training:
            x = (F.dropout3d if self.spatial_dims == 3 else F.dropout2d)(x, self.dropout)
        return x

    def forward_stages(self, x: torch.Tensor,
                       run_stage: Callable[[int, nn.Module, torch.Tensor], object] | None = None) -> torch.Tensor:
        """Stem, encoder stages and decoder; ``run_stage(i, stage, x)`` runs stage ``i``
        (default: ``stage(x)``)."""
        run_stage = run_stage or (lambda i, stage, inp: stage(inp))
        x = self.forward_stem(x)
        skips = []
        for i, stage in enumerate(self.stages):
            out = run_stage(i, stage, x)
            if isinstance(out, tuple):
                skips.append(out[0])
                x = out[1]
            else:
                x = out
        for up, refine, skip in zip(self.ups, self.refine, reversed(skips)):
            x = refine(up(x, skip))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)


class SegmentationHead(nn.Module):
    """One residual block and a 1x1 conv to class logits (the official ``lastdecoder``
    without its softmax): ``(B, w, *S) -> (B, K, *S)``."""

    def __init__(self, spatial_dims: int, width: int, num_classes: int, norm: str = "batch") -> None:
        super().__init__()
        self.block = ResidualBlock(spatial_dims, width, norm)
        self.out = conv_layer(spatial_dims)(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(x))


__all__ = ["EncoderStage", "ResidualUNet", "SegmentationHead"]
