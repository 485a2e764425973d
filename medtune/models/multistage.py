"""FreMAE's multi-stage trunk, and the segmentation decoder that takes it over.

The trunk turns a backbone's stage maps (and, with an input path, the input image) into
one map per level and fuses them top-down, deep -> shallow -> full resolution:

- backbones whose stages all have the same stride (plain ViT: 16) first go through a
  simple feature pyramid (as in ViTDet / UperNet-on-ViT): the last four stage maps are
  resampled to strides ``s/4, s/2, s, 2s`` with transposed convs, identity and max-pool;
  hierarchical backbones keep their stage strides;
- with ``image_channels`` set, :class:`InputPath` (a full-resolution residual conv block
  of the input, as FreMIM's ``encoder1``) adds a level of stride 1;
- each :class:`TopDownBlock` upsamples the deeper map to the skip's resolution,
  concatenates and fuses with a 1x1 conv; maps still coarser than the input at the end
  are upsampled with transposed convs.

:class:`~medtune.pretrain.decoder.MultiStageDecoder` (FreMAE's light decoder) is this
trunk plus its pretraining heads (the high-band head on the trunk's full-resolution map,
the bottom-up low-band path). :class:`MultiStageSegmentationDecoder` (decoder
``"multistage"`` of segmentation) is the trunk plus a 1x1 classifier, with the same
module names, so a segmenter loads the trunk of a FreMAE run (its ``decoder.safetensors``)
and trains only the classifier from scratch, as FreMIM finetunes its whole pretrained
network::

    decoder = create_decoder("multistage", (192,) * 4, (16,) * 4, num_classes=4,
                             spatial_dims=2, image_channels=4, width=32)
    logits = decoder(stages, (64, 64), image)   # (B, 4, 64, 64)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtune.errors import ConfigError
from medtune.models.blocks import ConvNormAct, conv_layer, conv_transpose_layer, norm_layer, resize


def log2_exact(ratio: float, what: str) -> int:
    """``k`` with ``2**k == ratio``; a ValueError naming ``what`` for other ratios."""
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


class Upsample2x(nn.Sequential):
    """Transposed conv, kernel 2 stride 2, then BatchNorm and ReLU: ``(B, C, *S) -> (B, C', *2S)``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int):
        super().__init__(
            conv_transpose_layer(spatial_dims)(cin, cout, 2, stride=2, bias=False),
            norm_layer(spatial_dims, "batch", cout),
            nn.ReLU(inplace=True),
        )


def resample_stage(spatial_dims: int, cin: int, cout: int, factor: float) -> nn.Module:
    """Project ``cin -> cout`` and change the resolution by ``factor`` (a power of two):
    transposed convs to upsample, max-pool to downsample."""
    if factor >= 1:
        steps = log2_exact(factor, "simple pyramid")
        layers: list[nn.Module] = [ConvNormAct(spatial_dims, cin, cout, kernel_size=1)]
        layers += [Upsample2x(spatial_dims, cout, cout) for _ in range(steps)]
        return nn.Sequential(*layers)
    steps = log2_exact(1 / factor, "simple pyramid")
    max_pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[spatial_dims - 1]
    return nn.Sequential(max_pool(2**steps), ConvNormAct(spatial_dims, cin, cout, kernel_size=1))


def pyramid_strides(feature_strides: Sequence[int]) -> list[int]:
    """Strides of the levels the trunk works on.

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
    """Full-resolution residual conv block of the (masked) input (as MONAI's
    ``UnetrBasicBlock`` that FreMIM's ``encoder1`` is, with BatchNorm and ReLU):
    ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + BN(conv1x1(x)))``, ``(B, M, *S) -> (B, width, *S)``."""

    def __init__(self, spatial_dims: int, cin: int, width: int) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.conv1 = ConvNormAct(spatial_dims, cin, width, kernel_size=3)
        self.conv2 = nn.Sequential(conv(width, width, 3, padding=1, bias=False), norm_layer(spatial_dims, "batch", width))
        self.shortcut = nn.Sequential(conv(cin, width, 1, bias=False), norm_layer(spatial_dims, "batch", width))

    def forward(self, image: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(image)) + self.shortcut(image), inplace=True)


class TopDownBlock(nn.Module):
    """Upsample the deeper map to the skip's resolution (transposed convs), concatenate,
    fuse with a 1x1 conv (as FreMIM's decoder: spatial mixing comes from the upsampling).

    ``out_width`` (default ``width``): channels of the skip, of the last upsampling step's
    output and of the fused map (the full-resolution level may be narrower)."""

    def __init__(self, spatial_dims: int, width: int, factor: int, out_width: int | None = None) -> None:
        super().__init__()
        steps = log2_exact(factor, "top-down path")
        out_width = width if out_width is None else out_width
        widths = [width] * steps + [out_width]
        self.upsample = nn.Sequential(*[Upsample2x(spatial_dims, widths[i], widths[i + 1]) for i in range(steps)])
        self.fuse = ConvNormAct(spatial_dims, 2 * out_width, out_width, kernel_size=1)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([skip, self.upsample(deep)], dim=1))


class MultiStageTrunk(nn.Module):
    """The pyramid and the top-down path over a backbone's stages (and the input image).

    Args:
        feature_channels: channels of each backbone stage (shallow to deep).
        feature_strides: stride of each stage w.r.t. the input.
        spatial_dims: 2 or 3.
        width: channels of the levels.
        image_channels: channels of the input read by the :class:`InputPath` (a level of
            stride 1; none is added when the first stage has stride 1); None: no input
            path, the trunk reads the stages only and upsamples its shallowest map.
        full_resolution_width: channels of the full-resolution maps when there is an
            input path (the input path, the top-down path's last upsampling and fused
            map); None: ``width``.

    Attributes: ``level_strides`` (shallow to deep, 1 first with an input path),
    ``level_widths``, ``full_width`` (channels of :meth:`forward_trunk`'s map).
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        spatial_dims: int,
        width: int = 32,
        image_channels: int | None = None,
        full_resolution_width: int | None = None,
    ) -> None:
        super().__init__()
        if len(feature_channels) != len(feature_strides):
            raise ValueError("feature_channels and feature_strides differ in length")
        self.spatial_dims = spatial_dims
        self.level_strides = pyramid_strides(feature_strides)
        if len(set(feature_strides)) == 1:
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
        self.full_width = width
        if image_channels is not None and self.level_strides[0] > 1:
            self.full_width = width if full_resolution_width is None else int(full_resolution_width)
            self.input_path = InputPath(spatial_dims, int(image_channels), self.full_width)
            self.level_strides = [1, *self.level_strides]
        self.level_widths = [self.full_width] + [width] * (len(self.level_strides) - 1)

        strides = self.level_strides
        self.top_down = nn.ModuleList(
            TopDownBlock(spatial_dims, width, strides[i + 1] // strides[i], self.level_widths[i])
            for i in range(len(strides) - 1)
        )
        # From the shallowest level to full resolution (full-resolution 3x3 convs would
        # dominate the step time; transposed convs keep it a light head).
        self.to_full_resolution = nn.Sequential(
            *[Upsample2x(spatial_dims, width, width) for _ in range(log2_exact(strides[0], "full-resolution upsampling"))]
        )

    @property
    def takes_image(self) -> bool:
        """Whether :meth:`pyramid` reads the input image (the segmenter then passes it)."""
        return self.input_path is not None

    def pyramid(self, stages: Sequence[Tensor], image: Tensor | None = None) -> list[Tensor]:
        """Stage maps (and ``image`` through the input path) -> ``width``-channel maps at
        :attr:`level_strides`, shallow to deep."""
        levels = [lateral(channels_last(stages[index])) for lateral, index in zip(self.lateral, self.source_index)]
        if self.input_path is not None:
            if image is None:
                raise ConfigError("this decoder has an input path: pass the (masked) input image")
            levels.insert(0, self.input_path(channels_last(image)))  # (B, full_width, *S)
        return levels

    def forward_trunk(self, levels: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Deep -> shallow -> full resolution.

        Returns the full-resolution map ``(B, full_width, *S)`` and the path's map at
        every level ``[(B, width_i, *S/stride_i), ...]``.
        """
        x = levels[-1]
        fused = [x]
        for i in range(len(levels) - 2, -1, -1):
            x = self.top_down[i](x, levels[i])  # (B, width_i, *S/stride_i)
            fused.insert(0, x)
        return self.to_full_resolution(x), fused  # (B, full_width, *S)

    def trunk(self) -> nn.Module:
        """A module holding the trunk's blocks only (under the names here): what a FreMAE run
        writes to ``decoder.safetensors`` and :class:`MultiStageSegmentationDecoder` loads."""
        view = nn.Module()
        view.lateral, view.top_down, view.to_full_resolution = self.lateral, self.top_down, self.to_full_resolution
        if self.input_path is not None:
            view.input_path = self.input_path
        return view


class MultiStageSegmentationDecoder(MultiStageTrunk):
    """Decoder ``"multistage"``: the trunk and a 1x1 classifier on its full-resolution map.

    ``forward(features, out_size, image)``: the backbone's stages and (with an input
    path) its input ``(B, M, *S)`` -> logits ``(B, K, *out_size)``.
    """

    takes_pretrained_blocks = True  # a FreMAE run's trunk (decoder 'light') loads into it
    head_modules = ("classifier",)  # what forward_head adds to forward_decoder

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        num_classes: int,
        spatial_dims: int,
        width: int = 32,
        image_channels: int | None = None,
        full_resolution_width: int | None = None,
    ) -> None:
        super().__init__(feature_channels, feature_strides, spatial_dims, width, image_channels, full_resolution_width)
        self.classifier = conv_layer(spatial_dims)(self.full_width, num_classes, 1)

    @property
    def embedding_channels(self) -> int:
        return self.full_width

    def forward_decoder(self, features: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """The last map before the classifier, ``(B, full_width, *S)``."""
        return self.forward_trunk(self.pyramid(features, image))[0]

    def forward_head(self, decoded: Tensor, out_size: Sequence[int]) -> Tensor:
        return self.classifier(resize(decoded, out_size))  # (B, K, *out_size)

    def forward(self, features: Sequence[Tensor], out_size: Sequence[int], image: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_decoder(features, image), out_size)


def build_multistage_decoder(
    in_channels: Sequence[int],
    in_strides: Sequence[int],
    num_classes: int,
    spatial_dims: int = 2,
    *,
    image_channels: int,
    width: int = 32,
    image_path: bool = True,
    full_resolution_width: int | None = None,
) -> MultiStageSegmentationDecoder:
    """Decoder ``"multistage"``; set ``width``, ``image_path`` and ``full_resolution_width``
    as the FreMAE run's ``objective.decoder_width``, ``image_path`` and
    ``full_resolution_width`` to take over its trunk."""
    return MultiStageSegmentationDecoder(
        in_channels, in_strides, num_classes, spatial_dims, width,
        image_channels if image_path else None, full_resolution_width,
    )


build_multistage_decoder.takes_image = True  # type: ignore[attr-defined]  # create_decoder passes image_channels

__all__ = [
    "InputPath", "MultiStageSegmentationDecoder", "MultiStageTrunk", "TopDownBlock", "Upsample2x",
    "build_multistage_decoder", "channels_last", "log2_exact", "pyramid_strides", "resample_stage",
]
