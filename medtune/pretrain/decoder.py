"""FreMAE's multi-stage supervision decoder, for any backbone and for 2D or 3D.

The decoder reads the encoder's stage maps and makes two predictions in image space:

- a **top-down** path (deep -> shallow: upsample, concatenate the skip, conv) that ends
  at full resolution and predicts the image whose *high* band is supervised;
- a **bottom-up** path (shallow -> deep: stride-2 convs, concatenate the stage, conv)
  that ends at stride ``2 * low_pool`` (8), where it takes the top-down path's map of
  that level (which carries all deeper stages), is resized to ``1 / low_pool``
  resolution and predicts the image whose *low* band is supervised.

This is FreMIM's arrangement: its low path runs over the shallow encoder maps and ends
at the stride-8 decoder map that already fused the two deepest stages, then is resized
2x. Ending at the deepest stage instead (stride 32) would have to blow a 2 x 2 map up to
16 x 16 for a 64-pixel input.

Shallow, high-resolution features carry detail (high frequencies), deep features carry
semantics (low frequencies); each supervision is attached where its information lives.
Each path ends with a :class:`~medtune.pretrain.frequency.GlobalFilter` and a 1x1 conv
to the modality count.

Backbones whose stages all have the same stride (plain ViT: 16) first go through a
simple feature pyramid (as in ViTDet / UperNet-on-ViT): the last four stage maps are
resampled to strides ``s/4, s/2, s, 2s`` with transposed convs, identity and max-pool.

With ``image_channels`` set (FreMAE's default) the decoder also reads the masked input
through :class:`InputPath`, a full-resolution residual conv block, as FreMIM's
``encoder1`` (its ``enc0`` is the shallowest map of both heads). Its map is a level of
stride 1: the top-down path ends by fusing it, the bottom-up path starts from it.
(A backbone whose first stage is already at stride 1, e.g. SwinUNETR with patch size 1,
needs none.) Without it the full-resolution head sees only maps of stride 4 and coarser (16 for a
ViT, before the pyramid), from which the per-pixel detail of the visible pixels cannot
be recovered, and the high band is not learned (its loss stays at that of a zero
prediction).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtune.pretrain.frequency import GlobalFilter


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def transposed_conv_layer(spatial_dims: int) -> type[nn.Module]:
    return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 1]


def batch_norm_layer(spatial_dims: int) -> type[nn.Module]:
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1]


def max_pool_layer(spatial_dims: int) -> type[nn.Module]:
    return (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[spatial_dims - 1]


def _log2_exact(ratio: float, what: str) -> int:
    steps = round(math.log2(ratio)) if ratio > 0 else -1
    if steps < 0 or 2**steps != ratio:
        raise ValueError(f"{what}: stride ratio {ratio} is not a power of two")
    return steps


def channels_last(x: Tensor) -> Tensor:
    """A 2D map ``(B, C, H, W)`` stored channels-last (others as they are): oneDNN's
    convolutions, their gradients and BatchNorm run faster on it than on the default layout
    (the full-resolution input path's forward and backward take about 2/3 of the time on a
    CPU) and give the same values. 3D maps keep their layout: oneDNN picks other
    algorithms for channels-last 3D convolutions, which move FreMAE's loss by 2e-5."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class ConvNormAct(nn.Sequential):
    """Conv (kernel ``k``, stride ``s``) -> BatchNorm -> ReLU, for ``spatial_dims`` dims."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            conv_layer(spatial_dims)(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            batch_norm_layer(spatial_dims)(cout),
            nn.ReLU(inplace=True),
        )


class Upsample2x(nn.Sequential):
    """Transposed conv, kernel 2 stride 2, then BatchNorm and ReLU: ``(B, C, *S) -> (B, C', *2S)``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int):
        super().__init__(
            transposed_conv_layer(spatial_dims)(cin, cout, 2, stride=2, bias=False),
            batch_norm_layer(spatial_dims)(cout),
            nn.ReLU(inplace=True),
        )


def resample_stage(spatial_dims: int, cin: int, cout: int, factor: float) -> nn.Module:
    """Project ``cin -> cout`` and change the resolution by ``factor`` (a power of two):
    transposed convs to upsample, max-pool to downsample."""
    if factor >= 1:
        steps = _log2_exact(factor, "simple pyramid")
        layers: list[nn.Module] = [ConvNormAct(spatial_dims, cin, cout, kernel=1)]
        layers += [Upsample2x(spatial_dims, cout, cout) for _ in range(steps)]
        return nn.Sequential(*layers)
    steps = _log2_exact(1 / factor, "simple pyramid")
    return nn.Sequential(
        max_pool_layer(spatial_dims)(2**steps), ConvNormAct(spatial_dims, cin, cout, kernel=1)
    )


def pyramid_strides(feature_strides: Sequence[int]) -> list[int]:
    """Strides of the levels the decoder works on.

    Hierarchical backbones: the stage strides themselves (sorted shallow to deep). Plain
    backbones (all strides ``s`` equal): ``s/4, s/2, s, 2s`` (at least 1).
    """
    strides = list(feature_strides)
    if len(set(strides)) == 1:
        s = strides[0]
        return [max(1, s // 4), max(1, s // 2), s, 2 * s]
    if strides != sorted(strides):
        raise ValueError(f"backbone feature_strides {strides} are not ordered shallow to deep")
    return strides


class InputPath(nn.Module):
    """Full-resolution residual conv block of the masked input (as MONAI's
    ``UnetrBasicBlock`` that FreMIM's ``encoder1`` is, with BatchNorm and ReLU):
    ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + BN(conv1x1(x)))``, ``(B, M, *S) -> (B, width, *S)``."""

    def __init__(self, spatial_dims: int, cin: int, width: int) -> None:
        super().__init__()
        conv, norm = conv_layer(spatial_dims), batch_norm_layer(spatial_dims)
        self.conv1 = ConvNormAct(spatial_dims, cin, width, kernel=3)
        self.conv2 = nn.Sequential(conv(width, width, 3, padding=1, bias=False), norm(width))
        self.shortcut = nn.Sequential(conv(cin, width, 1, bias=False), norm(width))

    def forward(self, image: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(image)) + self.shortcut(image), inplace=True)


class TopDownBlock(nn.Module):
    """Upsample the deeper map to the skip's resolution (transposed convs), concatenate,
    fuse with a 1x1 conv (as FreMIM's decoder: spatial mixing comes from the upsampling).

    ``out_width`` (default ``width``): channels of the skip, of the last upsampling step's
    output and of the fused map (the full-resolution level may be narrower)."""

    def __init__(self, spatial_dims: int, width: int, factor: int, out_width: int | None = None) -> None:
        super().__init__()
        steps = _log2_exact(factor, "top-down path")
        out_width = width if out_width is None else out_width
        widths = [width] * steps + [out_width]
        self.upsample = nn.Sequential(*[Upsample2x(spatial_dims, widths[i], widths[i + 1]) for i in range(steps)])
        self.fuse = ConvNormAct(spatial_dims, 2 * out_width, out_width, kernel=1)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([skip, self.upsample(deep)], dim=1))


class BottomUpBlock(nn.Module):
    """Downsample the shallower map (``in_width`` channels, default ``width``) with stride-2
    3x3 convs, concatenate the stage, fuse with a 1x1 conv."""

    def __init__(self, spatial_dims: int, width: int, factor: int, in_width: int | None = None) -> None:
        super().__init__()
        steps = _log2_exact(factor, "bottom-up path")
        widths = [width if in_width is None else in_width] + [width] * steps
        self.downsample = nn.Sequential(
            *[ConvNormAct(spatial_dims, widths[i], widths[i + 1], kernel=3, stride=2) for i in range(steps)]
        )
        self.fuse = ConvNormAct(spatial_dims, 2 * width, width, kernel=1)

    def forward(self, shallow: Tensor, stage: Tensor) -> Tensor:
        return self.fuse(torch.cat([stage, self.downsample(shallow)], dim=1))


class MultiStageDecoder(nn.Module):
    """Top-down high-band head and bottom-up low-band head over the encoder's stages.

    Args:
        feature_channels: channels of each encoder stage (shallow to deep).
        feature_strides: stride of each stage w.r.t. the input.
        out_channels: ``M``, the modality count (what is reconstructed).
        image_size: spatial size ``S`` of the input, e.g. ``(128, 128)``.
        spatial_dims: 2 or 3.
        width: channels of both paths.
        low_pool: the low-band prediction has size ``S / low_pool``.
        filter_per_channel: the global filters hold one transfer function per channel
            (FreMIM) or one shared by all channels (far fewer parameters for 3D crops).
        image_channels: channels of the masked input read by the :class:`InputPath`
            (a level of stride 1; none is added when the first stage has stride 1);
            None: no input path, the heads read the stages only.
        image_to_low: the input path also starts the bottom-up (low-band) path, as
            FreMIM's ``enc0`` does; False: the bottom-up path starts at the shallowest
            stage map, so the low band is predicted from the encoder's stages only (a conv
            path from the masked input to a 4x-pooled image would otherwise solve the
            low band around the encoder).
        full_resolution_width: channels of the full-resolution maps when there is an
            input path (the input path, the top-down path's last upsampling and fused
            map, the high-band filter and head); None: ``width``. A narrower one cuts the
            convolutions at full resolution, most of a small backbone's step.

    Shapes: ``forward(stages, image_size, image)`` with ``stages[i]``
    ``(B, C_i, *S/stride_i)`` and ``image`` the masked input ``(B, image_channels, *S)``
    (ignored without an input path) returns ``(high, low)``: ``(B, M, *S)`` and
    ``(B, M, *S/low_pool)``.
    """

    takes_image = True

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        out_channels: int,
        image_size: Sequence[int],
        spatial_dims: int,
        width: int = 32,
        low_pool: int = 4,
        filter_per_channel: bool = True,
        image_channels: int | None = None,
        image_to_low: bool = True,
        full_resolution_width: int | None = None,
    ) -> None:
        super().__init__()
        if len(feature_channels) != len(feature_strides):
            raise ValueError("feature_channels and feature_strides differ in length")
        self.spatial_dims = spatial_dims
        self.image_size = tuple(int(s) for s in image_size)
        self.low_pool = low_pool
        self.low_size = tuple(s // low_pool for s in self.image_size)
        self.plain = len(set(feature_strides)) == 1
        self.level_strides = pyramid_strides(feature_strides)
        if self.plain:
            # The last four maps (the last one repeated if there are fewer) -> s/4 .. 2s.
            picks = [max(0, len(feature_channels) - 4 + i) for i in range(4)]
            sources = [(p, feature_strides[p]) for p in picks]
        else:
            sources = list(enumerate(feature_strides))
        self.source_index = [index for index, _ in sources]
        self.lateral = nn.ModuleList(
            resample_stage(spatial_dims, feature_channels[index], width, stride / target)
            for (index, stride), target in zip(sources, self.level_strides)
        )
        self.input_path = None
        full_width = width
        if image_channels is not None and self.level_strides[0] > 1:
            full_width = width if full_resolution_width is None else int(full_resolution_width)
            self.input_path = InputPath(spatial_dims, int(image_channels), full_width)
            self.level_strides = [1, *self.level_strides]
        level_widths = [full_width] + [width] * (len(self.level_strides) - 1)

        strides = self.level_strides
        self.top_down = nn.ModuleList(
            TopDownBlock(spatial_dims, width, strides[i + 1] // strides[i], level_widths[i])
            for i in range(len(strides) - 1)
        )
        # From the shallowest level to full resolution (full-resolution 3x3 convs would
        # dominate the step time; transposed convs keep it a light head).
        self.to_full_resolution = nn.Sequential(
            *[Upsample2x(spatial_dims, width, width) for _ in range(_log2_exact(strides[0], "full-resolution upsampling"))]
        )
        self.high_filter = GlobalFilter(full_width if filter_per_channel else 1, self.image_size, spatial_dims)
        self.high_head = conv_layer(spatial_dims)(full_width, out_channels, 1)

        # The bottom-up path starts at the input path's level (or, without image_to_low,
        # at the first stage's) and stops at the deepest level of stride <= 2 * low_pool.
        self.low_start_level = 1 if self.input_path is not None and not image_to_low else 0
        self.low_end_level = max([self.low_start_level] + [i for i, s in enumerate(strides) if s <= 2 * low_pool])
        if level_widths[self.low_end_level] != width:
            raise ValueError(f"full_resolution_width {full_width} differs from width {width} but the "
                             f"low-band head (low_pool {low_pool}) would read the full-resolution map")
        self.bottom_up = nn.ModuleList(
            BottomUpBlock(spatial_dims, width, strides[i + 1] // strides[i], level_widths[i])
            for i in range(self.low_start_level, self.low_end_level)
        )
        self.low_filter = GlobalFilter(width if filter_per_channel else 1, self.low_size, spatial_dims)
        self.low_head = conv_layer(spatial_dims)(width, out_channels, 1)

    def pyramid(self, stages: Sequence[Tensor], image: Tensor | None = None) -> list[Tensor]:
        """Stage maps (and the masked ``image`` through the input path) -> ``width``-channel
        maps at :attr:`level_strides`, shallow to deep."""
        levels = [lateral(channels_last(stages[index])) for lateral, index in zip(self.lateral, self.source_index)]
        if self.input_path is not None:
            if image is None:
                raise ValueError("this decoder has an input path: pass the masked image")
            levels.insert(0, self.input_path(channels_last(image)))  # (B, width, *S)
        return levels

    def forward_top_down(self, levels: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Deep -> shallow -> full resolution.

        Returns the high-band prediction ``(B, M, *S)`` and the path's map at every
        level ``[(B, width, *S/stride_i), ...]``.
        """
        x = levels[-1]
        fused = [x]
        for i in range(len(levels) - 2, -1, -1):
            x = self.top_down[i](x, levels[i])  # (B, width, *S/stride_i)
            fused.insert(0, x)
        x = self.to_full_resolution(x)  # (B, width, *S)
        return self.high_head(self.high_filter(x)), fused

    def forward_bottom_up(self, levels: list[Tensor], fused: list[Tensor], low_size: Sequence[int]) -> Tensor:
        """Shallow -> stride ``2 * low_pool``, resized to ``low_size = S / low_pool``.

        ``levels``: the pyramid maps; ``fused``: the top-down path's maps (the last step
        takes the top-down map, which carries the deeper stages). Returns
        ``(B, M, *low_size)``.
        """
        start, end = self.low_start_level, self.low_end_level
        x = levels[start] if end > start else fused[start]
        for i in range(start + 1, end + 1):
            x = self.bottom_up[i - 1 - start](x, fused[i] if i == end else levels[i])  # (B, width, *S/stride_i)
        mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
        x = F.interpolate(x, size=tuple(low_size), mode=mode, align_corners=True)  # (B, width, *S/4)
        return self.low_head(self.low_filter(x))

    def forward(
        self, stages: Sequence[Tensor], image_size: Sequence[int] | None = None, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``image_size``: the input's ``S`` when it differs from the size the decoder was
        built for (the global filters then resample their transfer functions); ``image``:
        the masked input the input path reads."""
        levels = self.pyramid(stages, image)
        low_size = self.low_size if image_size is None else tuple(s // self.low_pool for s in image_size)
        high, fused = self.forward_top_down(levels)
        return high, self.forward_bottom_up(levels, fused, low_size)


__all__ = ["MultiStageDecoder", "InputPath", "ConvNormAct", "Upsample2x", "pyramid_strides", "conv_layer", "channels_last"]
