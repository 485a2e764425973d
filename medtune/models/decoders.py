"""Segmentation decoders over a backbone's stage features, for any ``spatial_dims``.

- :class:`UperNetDecoder` (UperNet: pyramid pooling on the deepest map + FPN top-down
  path + fusion of all levels). For a plain ViT, whose blocks 3/6/9/12 all have stride
  16, the features are first resampled into a pyramid of strides 4/8/16/32 (transposed
  convs up, max-pool down), as in the BEiT/MAE segmentation recipes.
- :class:`UNetDecoder` (U-Net style: from the deepest stage up, upsample x2, concatenate
  the skip of the next-shallower stage, two conv blocks) for hierarchical backbones
  (Swin, ConvNeXt, SwinUNETR).
- ``agln`` (:mod:`medtune.models.agln`): AGLN's Context Fusion Blocks for hierarchical
  backbones.
- ``unetr`` (:mod:`medtune.models.unetr`): MONAI SwinUNETR's own decoder for
  ``swinunetr`` backbones; it also reads the input image, and takes over the UNETR blocks
  of a FreMAE run pretrained with ``objective.decoder: unetr``.
- ``multistage`` (:mod:`medtune.models.multistage`): FreMAE's light-decoder trunk (pyramid,
  full-resolution input path, top-down path) and a 1x1 classifier, for any backbone; it
  reads the input image too, and takes over the trunk of a FreMAE run pretrained with
  ``objective.decoder: light`` (the default).

Each takes ``features = [(B, C_i, *S_i), ...]`` (shallow -> deep, as
``Backbone.forward_stages`` returns them) and the input's spatial size, and returns
logits ``(B, K, *S)`` at the input resolution. Made by name through :data:`DECODERS`::

    decoder = create_decoder("auto", in_channels=(192,) * 4, in_strides=(16,) * 4,
                             num_classes=4, spatial_dims=2)

Every decoder splits its ``forward(features, out_size)`` into ``forward_decoder(features)``
(``unetr``, ``multistage``: ``forward_decoder(features, image)``)
(the last feature map before the classifier, ``embedding_channels`` wide: the pixel
embedding that contrastive losses read) and ``forward_head(map, out_size)`` (the logits);
``head_modules`` names the modules only ``forward_head`` uses (a model that puts its own
heads on ``forward_decoder``, as the dynamic task's paths, drops them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.errors import ConfigError
from medtune.models.blocks import ConvNormAct, conv_layer, conv_transpose_layer, norm_layer, resize
from medtune.registry import Registry

DECODERS: Registry = Registry("decoder")


def _rescale(spatial_dims: int, channels: int, factor: float, norm: str) -> nn.Module:
    """Change a map's resolution by ``factor`` (a power of 2): transposed convs up, max-pool down."""
    if factor == 1:
        return nn.Identity()
    steps = int(round(math.log2(factor)))
    if 2**steps != factor and 2.0**steps != factor:
        raise ConfigError(f"decoder can only rescale by powers of 2, got {factor}")
    if steps < 0:
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]
        return pool(kernel_size=2 ** (-steps), stride=2 ** (-steps))
    layers: list[nn.Module] = []
    for i in range(steps):
        layers.append(conv_transpose_layer(spatial_dims)(channels, channels, kernel_size=2, stride=2))
        if i < steps - 1:
            layers += [norm_layer(spatial_dims, norm, channels), nn.GELU()]
    return nn.Sequential(*layers)


class PyramidPooling(nn.Module):
    """PSP module: average-pool to each scale, 1x1 conv, upsample, concat with the input, fuse."""

    def __init__(self, spatial_dims: int, in_ch: int, channels: int, scales: Sequence[int], norm: str):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.scales = tuple(scales)
        # No normalisation on the pooled maps: a 1x1 map of batch 1 has no batch statistics.
        self.branches = nn.ModuleList(
            nn.Sequential(conv_layer(spatial_dims)(in_ch, channels, kernel_size=1), nn.ReLU(inplace=True))
            for _ in self.scales
        )
        self.fuse = ConvNormAct(spatial_dims, in_ch + channels * len(self.scales), channels, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[self.spatial_dims]
        size = x.shape[2:]
        pooled = [resize(branch(pool(x, scale)), size) for scale, branch in zip(self.scales, self.branches)]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class UperNetDecoder(nn.Module):
    """UperNet over N stage features; plain-ViT features are made a pyramid first.

    Args:
        in_channels: channels of each input feature (shallow -> deep).
        in_strides: stride of each feature w.r.t. the input. If they are all equal
            (plain ViT), feature i is resampled to stride ``s * 2**(i - N + 2)``
            (4/8/16/32 for four stride-16 maps).
        num_classes: K output channels.
        spatial_dims: 2 for slices, 3 for volumes.
        channels: width of the decoder.
        pool_scales: output sizes of the pyramid pooling module.
        dropout: dropout before the classifier.
        norm: "batch", "instance" or "group".
    """

    head_modules = ("classifier",)  # what forward_head adds to forward_decoder

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        channels: int = 128,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ConfigError("decoder needs one stride per feature channel count (and at least one)")
        n = len(in_channels)
        if len(set(in_strides)) == 1:
            base = in_strides[0]
            self.strides = tuple(base * 2.0 ** (i - n + 2) for i in range(n))
            self.rescale = nn.ModuleList(
                _rescale(spatial_dims, c, base / s, norm) for c, s in zip(in_channels, self.strides)
            )
        else:
            self.strides = tuple(float(s) for s in in_strides)
            self.rescale = nn.ModuleList(nn.Identity() for _ in in_channels)
        self.ppm = PyramidPooling(spatial_dims, in_channels[-1], channels, pool_scales, norm)
        self.lateral = nn.ModuleList(
            ConvNormAct(spatial_dims, c, channels, kernel_size=1, norm=norm) for c in in_channels[:-1]
        )
        self.fpn = nn.ModuleList(ConvNormAct(spatial_dims, channels, channels, norm=norm) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(spatial_dims, channels * n, channels, norm=norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = conv_layer(spatial_dims)(channels, num_classes, kernel_size=1)
        self.embedding_channels = channels  # of forward_decoder's output

    def forward_decoder(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features [(B, C_i, *S_i)]`` -> the fused map ``(B, channels, *S_0)`` the
        classifier reads (the pixel embedding of losses such as PNE)."""
        pyramid = [rescale(f) for rescale, f in zip(self.rescale, features)]
        levels = [lat(f) for lat, f in zip(self.lateral, pyramid[:-1])] + [self.ppm(pyramid[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down: deep -> shallow
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[2:])
        outs = [conv(level) for conv, level in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[2:]
        return self.fuse(torch.cat([resize(o, size) for o in outs], dim=1))  # (B, C, *S/4)

    def forward_head(self, fused: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """The fused map -> logits ``(B, K, *out_size)``."""
        return resize(self.classifier(self.dropout(fused)), out_size)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """``features [(B, C_i, *S_i)]`` -> logits ``(B, K, *out_size)``."""
        return self.forward_head(self.forward_decoder(features), out_size)


class UNetDecoder(nn.Module):
    """U-Net-style decoder for hierarchical features (strides increasing, e.g. 4/8/16/32).

    From the deepest feature up: upsample to the next-shallower feature's size,
    concatenate it, two 3x3 conv blocks. The shallowest level is then upsampled to the
    input size, refined by a conv block, and classified.

    Args:
        in_channels: channels of each feature (shallow -> deep).
        in_strides: stride of each feature (only checked to increase).
        num_classes: K output channels.
        spatial_dims: 2 or 3.
        channels: decoder widths per level, shallow -> deep (default: min(C_i, 256)).
        norm: "batch", "instance" or "group".
    """

    head_modules = ("head", "classifier")  # what forward_head adds to forward_decoder

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        channels: Sequence[int] | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ConfigError("decoder needs one stride per feature channel count (and at least one)")
        if any(b < a for a, b in zip(in_strides, in_strides[1:])):
            raise ConfigError(f"UNet decoder needs strides shallow -> deep, got {tuple(in_strides)}")
        widths = list(channels) if channels is not None else [min(c, 256) for c in in_channels]
        if len(widths) != len(in_channels):
            raise ConfigError("decoder 'channels' needs one width per backbone stage")
        self.bottleneck = ConvNormAct(spatial_dims, in_channels[-1], widths[-1], norm=norm)
        self.up_blocks = nn.ModuleList()
        for i in range(len(in_channels) - 2, -1, -1):
            self.up_blocks.append(
                nn.Sequential(
                    ConvNormAct(spatial_dims, widths[i + 1] + in_channels[i], widths[i], norm=norm),
                    ConvNormAct(spatial_dims, widths[i], widths[i], norm=norm),
                )
            )
        self.head = ConvNormAct(spatial_dims, widths[0], widths[0], norm=norm)
        self.classifier = conv_layer(spatial_dims)(widths[0], num_classes, kernel_size=1)
        self.embedding_channels = widths[0]  # of forward_decoder's output

    def forward_decoder(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features [(B, C_i, *S_i)]`` -> the shallowest decoder map ``(B, widths[0], *S_0)``."""
        x = self.bottleneck(features[-1])
        for block, skip in zip(self.up_blocks, reversed(features[:-1])):
            x = block(torch.cat([resize(x, skip.shape[2:]), skip], dim=1))
        return x

    def forward_head(self, decoded: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """The shallowest decoder map -> logits ``(B, K, *out_size)``."""
        return self.classifier(self.head(resize(decoded, out_size)))

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """``features [(B, C_i, *S_i)]`` -> logits ``(B, K, *out_size)``."""
        return self.forward_head(self.forward_decoder(features), out_size)


@DECODERS.register("upernet")
def build_upernet(in_channels, in_strides, num_classes, spatial_dims=2, **options) -> nn.Module:
    return UperNetDecoder(in_channels, in_strides, num_classes, spatial_dims, **options)


@DECODERS.register("unet")
def build_unet(in_channels, in_strides, num_classes, spatial_dims=2, **options) -> nn.Module:
    return UNetDecoder(in_channels, in_strides, num_classes, spatial_dims, **options)


# MONAI SwinUNETR's own decoder (swinunetr backbones; reads the input image too)
DECODERS.register_path("unetr", "medtune.models.unetr:build_unetr_decoder")
# FreMAE's light-decoder trunk + classifier (any backbone; reads the input image too)
DECODERS.register_path("multistage", "medtune.models.multistage:build_multistage_decoder")
DECODERS.register_path("agln", "medtune.models.agln:build_agln")


def create_decoder(
    name: str,
    in_channels: Sequence[int],
    in_strides: Sequence[int],
    num_classes: int,
    spatial_dims: int = 2,
    image_channels: int | None = None,
    **options,
) -> nn.Module:
    """Decoder by registry name; ``"auto"`` = UperNet for equal strides (plain ViT), else U-Net.

    ``image_channels``: the input's channels, for decoders that also read the input image
    (``unetr``, ``multistage``; they have ``takes_image = True`` and are called
    ``decoder(features, size, image)``).
    """
    if name == "auto":
        name = "upernet" if len(set(in_strides)) == 1 else "unet"
    build = DECODERS.get(name)
    if getattr(build, "takes_image", False):
        if image_channels is None:
            raise ConfigError(f"decoder '{name}' reads the input image: pass image_channels")
        options = {**options, "image_channels": image_channels}
    try:
        return build(tuple(in_channels), tuple(in_strides), num_classes, spatial_dims, **options)
    except TypeError as exc:
        raise ConfigError(f"decoder '{name}': bad option ({exc})") from None
