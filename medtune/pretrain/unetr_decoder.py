"""FreMAE's official whole network: SwinUNETR's UNETR blocks feeding the frequency heads.

The official FreMIM model is the whole MONAI SwinUNETR (2D), not only its encoder. The
UNETR trunk (:class:`~medtune.models.unetr.UnetrTrunk`: ``encoder1``-``encoder4``,
``encoder10``, ``decoder5``, ``decoder4``) turns the masked input and the encoder's
stages into four maps, ``fs = feature_size``:

    f0 = encoder1(masked input)          (B, fs,  *S)      a full-resolution conv of the input
    f1 = encoder2(stage 0)               (B, fs,  *S/2)
    f2 = encoder3(stage 1)               (B, 2fs, *S/4)
    f3 = decoder4(decoder5(encoder10(stage 4), stage 3), encoder4(stage 2))   (B, 4fs, *S/8)

and two heads read them (widths fs/fs/2fs/4fs; 48/48/96/192 for fs 48):

- high band, top-down: ``up_i(deep, skip) = ReLU(BN(conv1x1(cat(skip, convT2x2(conv1x1(deep))))))``
  from f3 to f0 (``4fs -> 2fs -> fs -> fs``), then the global filter (``fs`` channels at
  ``S``) and a 1x1 conv to ``M``;
- low band, bottom-up: ``down_i(shallow, stage) = ReLU(BN(conv1x1(cat(conv1x1(stage),
  conv3x3/2(conv1x1(shallow))))))`` from f0 to f3 (``fs -> fs -> 2fs -> 4fs``), a 1x1
  conv to ``low_channels`` (32), resized to ``S / low_pool`` (align_corners), the global
  filter and a 1x1 conv to ``M``.

At 128 px, fs 48, 4 modalities the objective (encoder, trunk, heads, mask token) has
26,999,750 parameters, as the official network. The trunk is what finetuning takes over
(:meth:`UnetrFrequencyDecoder.transferable`): a segmenter with decoder ``unetr`` loads
it; the heads are pretraining-only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtune.models.unetr import UnetrTrunk, check_swinunetr_stages
from medtune.models.blocks import conv_layer, conv_transpose_layer, norm_layer
from medtune.pretrain.frequency import GlobalFilter


class UpFuse(nn.Module):
    """Top-down step: ``ReLU(BN(conv1x1(cat(skip, convT(conv1x1(deep))))))``, ``(B, cin, *s) -> (B, cout, *2s)``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.project = conv_layer(spatial_dims)(cin, cout, 1)
        self.upsample = conv_transpose_layer(spatial_dims)(cout, cout, 2, stride=2)
        self.fuse = conv_layer(spatial_dims)(2 * cout, cout, 1)
        self.norm = norm_layer(spatial_dims, "batch", cout)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        up = self.upsample(self.project(deep))
        return F.relu(self.norm(self.fuse(torch.cat([skip, up], dim=1))), inplace=True)


class DownFuse(nn.Module):
    """Bottom-up step: ``ReLU(BN(conv1x1(cat(conv1x1(stage), conv3x3/2(conv1x1(shallow))))))``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.stage_project = conv(cout, cout, 1)
        self.project = conv(cin, cout, 1)
        self.downsample = conv(cout, cout, 3, stride=2, padding=1)
        self.fuse = conv(2 * cout, cout, 1)
        self.norm = norm_layer(spatial_dims, "batch", cout)

    def forward(self, shallow: Tensor, stage: Tensor) -> Tensor:
        down = self.downsample(self.project(shallow))
        return F.relu(self.norm(self.fuse(torch.cat([self.stage_project(stage), down], dim=1))), inplace=True)


class UnetrFrequencyDecoder(nn.Module):
    """The official FreMAE decoder: UNETR trunk + top-down high head + bottom-up low head.

    Args:
        feature_channels, feature_strides: the ``swinunetr`` backbone's stages.
        image_channels: ``M``, the modality count (input of ``encoder1``, output of the heads).
        image_size: ``S``, the size the global filters are stored for.
        spatial_dims: 2 or 3.
        low_channels: channels of the low head (official 32).
        low_pool: the low-band prediction has size ``S / low_pool``.
        filter_per_channel: one global-filter transfer function per channel (official) or one shared.
        norm_name: normalisation of the UNETR blocks (instance, as MONAI's SwinUNETR).

    ``forward(stages, image_size, image)`` with ``image`` the masked input ``(B, M, *S)``
    -> ``(high (B, M, *S), low (B, M, *S/low_pool))``.
    """

    takes_image = True

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        image_channels: int,
        image_size: Sequence[int],
        spatial_dims: int,
        low_channels: int = 32,
        low_pool: int = 4,
        filter_per_channel: bool = True,
        norm_name: str = "instance",
    ) -> None:
        super().__init__()
        fs = check_swinunetr_stages(feature_channels, feature_strides, "objective.decoder 'unetr'")
        self.spatial_dims = spatial_dims
        self.low_pool = low_pool
        self.image_size = tuple(int(s) for s in image_size)
        self.low_size = tuple(s // low_pool for s in self.image_size)
        self.blocks = UnetrTrunk(image_channels, fs, spatial_dims, norm_name)
        widths = (fs, fs, 2 * fs, 4 * fs)  # f0..f3
        self.top_down = nn.ModuleList(UpFuse(spatial_dims, widths[i + 1], widths[i]) for i in (2, 1, 0))
        self.bottom_up = nn.ModuleList(DownFuse(spatial_dims, widths[i], widths[i + 1]) for i in (0, 1, 2))
        self.low_project = conv_layer(spatial_dims)(widths[3], low_channels, 1)
        self.high_filter = GlobalFilter(fs if filter_per_channel else 1, self.image_size, spatial_dims)
        self.low_filter = GlobalFilter(low_channels if filter_per_channel else 1, self.low_size, spatial_dims)
        self.high_head = conv_layer(spatial_dims)(fs, image_channels, 1)
        self.low_head = conv_layer(spatial_dims)(low_channels, image_channels, 1)

    def transferable(self) -> nn.Module:
        """The part a segmenter takes over (MONAI names: ``encoder1.*`` ... ``decoder4.*``)."""
        return self.blocks

    def forward(self, stages: Sequence[Tensor], image_size: Sequence[int], image: Tensor) -> tuple[Tensor, Tensor]:
        enc0, enc1, enc2, _, dec2 = self.blocks.forward_trunk(image, stages)
        maps = [enc0, enc1, enc2, dec2]  # widths fs, fs, 2fs, 4fs at strides 1, 2, 4, 8
        high = maps[3]
        for step, skip in zip(self.top_down, (maps[2], maps[1], maps[0])):
            high = step(high, skip)  # (B, fs, *S) at the end
        low = maps[0]
        for step, stage in zip(self.bottom_up, maps[1:]):
            low = step(low, stage)  # (B, 4fs, *S/8) at the end
        low_size = tuple(s // self.low_pool for s in image_size)
        mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
        low = F.interpolate(self.low_project(low), size=low_size, mode=mode, align_corners=True)
        return self.high_head(self.high_filter(high)), self.low_head(self.low_filter(low))


__all__ = ["UnetrFrequencyDecoder", "UpFuse", "DownFuse"]
