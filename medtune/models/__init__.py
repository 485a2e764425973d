"""Backbones (timm, MONAI) behind one stage API, and their local pretrained weights."""

from medtune.models.backbones import (
    BACKBONES,
    Backbone,
    BackboneConfig,
    MonaiSwinBackbone,
    SwinUNETROptions,
    TimmBackbone,
    TimmViTBackbone,
    backbone_family,
    create_backbone,
    vit_stage_indices,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneConfig",
    "MonaiSwinBackbone",
    "SwinUNETROptions",
    "TimmBackbone",
    "TimmViTBackbone",
    "backbone_family",
    "create_backbone",
    "vit_stage_indices",
]
