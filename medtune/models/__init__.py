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
from medtune.models.weights import adapt_state_dict, load_pretrained, resolve_weight_path

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneConfig",
    "MonaiSwinBackbone",
    "SwinUNETROptions",
    "TimmBackbone",
    "TimmViTBackbone",
    "adapt_state_dict",
    "backbone_family",
    "create_backbone",
    "load_pretrained",
    "resolve_weight_path",
    "vit_stage_indices",
]
