"""The 2D segmenters a dynamic model runs on its paths (``model.segmenter``).

- ``resunet`` (default, the official): :class:`~medtune.models.resunet.ResidualUNet`, the
  TransBTS-style residual U-Net; a bit selector before each of its 4 encoder stages.
- ``backbone``: any medtune backbone (timm ViT / Swin / ConvNeXt / ``timm:<name>``,
  MONAI's Swin encoder; local pretrained weights such as a FreMAE run) with a tuning
  method (``full`` by default, or LoRA, AdaptFormer, VPT ...) and a decoder (``auto``,
  ``upernet``, ``unet``, ``agln``, ``unetr``), as the ``segmentation`` task builds them.
  Its quantization unit is the whole backbone (one bit selector, reading the image):
  timm runs a network's stages inside one ``forward_intermediates`` call, so they are
  not separate modules to run at separate bit widths.

Both follow one protocol, which is all :class:`~.model.DynamicSegmenter` uses:

- ``forward_stages(x, run_stage=None) -> features``: the network on slices
  ``x (N, M, h, w)`` with ``run_stage(i, unit, inp)`` running quantization unit ``i``
  (default ``unit(inp)``);
- ``stage_channels``: input channels of each unit (what its bit selector reads);
- ``stride``: slice sides must be multiples of it;
- ``fixed_size``: the one slice side the network takes, or None;
- ``make_head(num_classes) -> head``, ``head(features, size) -> logits (N, K, *size)``:
  each path has its own head on the shared network (the official ``lastdecoder`` per path).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from medtune.errors import ConfigError
from medtune.models.blocks import conv_layer, resize
from medtune.models.resunet import ResidualUNet, SegmentationHead

RunStage = Callable[[int, nn.Module, torch.Tensor], object]


class UNetPathSegmenter(ResidualUNet):
    """The residual U-Net (see :class:`ResidualUNet`) with the path-segmenter protocol."""

    fixed_size = None

    @property
    def features(self) -> int:
        return self.width

    def make_head(self, num_classes: int) -> nn.Module:
        return ResidualUNetHead(self.spatial_dims, self.width, num_classes, self.norm)


class ResidualUNetHead(SegmentationHead):
    """:class:`SegmentationHead` on the U-Net's full-resolution features (``size`` is theirs)."""

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        return super().forward(x)


class ClassifierHead(nn.Module):
    """A 1x1 conv to class logits, resized (bilinearly) to the slice: ``(N, C, h, w) -> (N, K, *size)``.
    Classifying before resizing gives the same logits as after (both are linear, the
    resize's weights sum to 1) at a fraction of the cost."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = conv_layer(2)(channels, num_classes, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return resize(self.classifier(x), size)


class BackbonePathSegmenter(nn.Module):
    """A medtune backbone (+ tuning method) and decoder over 2D slices; its features are
    the decoder's last map (``decoder.forward_decoder``), each path's head a
    :class:`ClassifierHead`. The decoder's own head (:attr:`head_modules` of the decoder
    classes) is dropped: the paths' heads replace it.

    Args:
        backbone_cfg: a :class:`~medtune.models.BackboneConfig` (2D).
        decoder: decoder registry name (``auto``: UperNet for a plain ViT, else U-Net).
        decoder_options: the decoder's options.
        adapter: the tuning method's section (``{"method": "full"}`` trains everything).
        where: the config key of this backbone, for messages.
    """

    def __init__(self, backbone_cfg, decoder: str = "auto", decoder_options: dict | None = None,
                 adapter: dict | None = None, where: str = "model.backbones[0]") -> None:
        super().__init__()
        from medtune.adapters import adapter_config_from_dict, apply_adapter
        from medtune.adapters.context import find_slice_contexts
        from medtune.models.backbones import create_backbone
        from medtune.models.decoders import create_decoder
        from medtune.models.weights import load_pretrained_decoder

        self.backbone = create_backbone(backbone_cfg)
        adapter = dict(adapter or {"method": "full"})
        apply_adapter(self.backbone, adapter_config_from_dict(adapter))
        if find_slice_contexts(self.backbone):
            raise ConfigError(
                f"model.adapter method '{adapter['method']}' mixes the slices of a volume; the dynamic task "
                "decides slice by slice: use full, lora, adaptformer, vpt or st-adapter"
            )
        self.decoder = create_decoder(decoder, self.backbone.feature_channels, self.backbone.feature_strides, 1, 2,
                                      image_channels=self.backbone.in_chans, **(decoder_options or {}))
        if backbone_cfg.pretrained:  # a FreMAE run also brings its decoder blocks (into multistage or unetr)
            load_pretrained_decoder(self.decoder, backbone_cfg.pretrained)
        self.features = int(self.decoder.embedding_channels)
        for name in getattr(self.decoder, "head_modules", ()):
            setattr(self.decoder, name, None)
        self.takes_image = bool(getattr(self.decoder, "takes_image", False))
        # sides must divide by the backbone's deepest stride and the decoder's (UperNet pools a plain ViT's maps to 32)
        self.stride = int(max(*self.backbone.feature_strides, *getattr(self.decoder, "strides", ())))
        self.fixed_size = self.backbone.img_size
        self.stage_channels = (self.backbone.in_chans,)
        self.where = where

    def make_head(self, num_classes: int) -> nn.Module:
        return ClassifierHead(self.features, num_classes)

    def forward_stages(self, x: torch.Tensor, run_stage: RunStage | None = None) -> torch.Tensor:
        """The backbone (quantization unit 0) and the decoder: ``(N, M, h, w) -> (N, C, h', w')``."""
        stages = list(run_stage(0, self.backbone, x) if run_stage else self.backbone(x))
        return self.decoder.forward_decoder(stages, *((x,) if self.takes_image else ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)


def build_path_segmenters(model_cfg, in_chans: int, slice_side: int, load_pretrained: bool = True) -> list[nn.Module]:
    """The segmenters of a dynamic model (V2: one; V1: the bank) as ``model_cfg.segmenter`` says."""
    if model_cfg.segmenter == "resunet":
        return [UNetPathSegmenter(spatial_dims=2, in_chans=in_chans, width=w, blocks=tuple(model_cfg.blocks),
                                  norm=model_cfg.norm) for w in model_cfg.widths]
    segmenters = []
    for i, cfg in enumerate(model_cfg.backbone_configs(in_chans, slice_side)):
        if not load_pretrained:
            import dataclasses

            cfg = dataclasses.replace(cfg, pretrained=None)
        segmenters.append(BackbonePathSegmenter(cfg, model_cfg.decoder, model_cfg.decoder_options, model_cfg.adapter,
                                                where=f"model.backbones[{i}]"))
    return segmenters


__all__ = ["BackbonePathSegmenter", "ClassifierHead", "ResidualUNetHead", "UNetPathSegmenter",
           "build_path_segmenters"]
