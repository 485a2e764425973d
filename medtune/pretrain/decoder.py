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

The pyramid (a plain ViT's stride-16 maps resampled to strides 4-32), the input path and
the top-down path are :class:`~medtune.models.multistage.MultiStageTrunk`, which a
segmenter with decoder ``multistage`` takes over (:meth:`MultiStageDecoder.transferable`,
written to the run's ``decoder.safetensors``); the two heads and the bottom-up path are
pretraining-only.

With ``image_channels`` set (FreMAE's default) the decoder also reads the masked input
through :class:`~medtune.models.multistage.InputPath`, a full-resolution residual conv
block, as FreMIM's ``encoder1`` (its ``enc0`` is the shallowest map of both heads). Its
map is a level of stride 1: the top-down path ends by fusing it, the bottom-up path
starts from it. (A backbone whose first stage is already at stride 1, e.g. SwinUNETR with
patch size 1, needs none.) Without it the full-resolution head sees only maps of stride 4
and coarser (16 for a ViT, before the pyramid), from which the per-pixel detail of the
visible pixels cannot be recovered, and the high band is not learned (its loss stays at
that of a zero prediction).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtune.models.blocks import ConvNormAct, conv_layer
from medtune.models.multistage import InputPath, MultiStageTrunk, log2_exact, pyramid_strides
from medtune.pretrain.frequency import GlobalFilter


class BottomUpBlock(nn.Module):
    """Downsample the shallower map (``in_width`` channels, default ``width``) with stride-2
    3x3 convs, concatenate the stage, fuse with a 1x1 conv."""

    def __init__(self, spatial_dims: int, width: int, factor: int, in_width: int | None = None) -> None:
        super().__init__()
        steps = log2_exact(factor, "bottom-up path")
        widths = [width if in_width is None else in_width] + [width] * steps
        self.downsample = nn.Sequential(
            *[ConvNormAct(spatial_dims, widths[i], widths[i + 1], kernel_size=3, stride=2) for i in range(steps)]
        )
        self.fuse = ConvNormAct(spatial_dims, 2 * width, width, kernel_size=1)

    def forward(self, shallow: Tensor, stage: Tensor) -> Tensor:
        return self.fuse(torch.cat([stage, self.downsample(shallow)], dim=1))


class MultiStageDecoder(MultiStageTrunk):
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
        super().__init__(feature_channels, feature_strides, spatial_dims, width, image_channels, full_resolution_width)
        self.image_size = tuple(int(s) for s in image_size)
        self.low_pool = low_pool
        self.low_size = tuple(s // low_pool for s in self.image_size)
        full_width, level_widths, strides = self.full_width, self.level_widths, self.level_strides
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
        full, fused = self.forward_trunk(levels)  # (B, full_width, *S), the top-down map of every level
        high = self.high_head(self.high_filter(full))  # (B, M, *S)
        return high, self.forward_bottom_up(levels, fused, low_size)

    def transferable(self) -> nn.Module:
        """The part a segmenter takes over (decoder ``multistage``): the trunk (the pyramid,
        the input path and the top-down path); the heads are pretraining-only."""
        return self.trunk()


__all__ = ["BottomUpBlock", "InputPath", "MultiStageDecoder", "pyramid_strides"]
