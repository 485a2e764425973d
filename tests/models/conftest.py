"""Fixtures of the backbone tests: the small hierarchical timm backbones."""

from __future__ import annotations

import pytest

from medtune.models import BackboneConfig


@pytest.fixture
def tiny_swin_config() -> BackboneConfig:
    """timm's Swin-T cut to one block per stage, widths 24/48/96/192 with 1/2/3/4 heads, on
    4-channel 64 px slices: stages of 16, 8, 4 and 2 tokens a side (timm's window 7 shrinks
    to fit the smaller maps)."""
    return BackboneConfig(name="swin_tiny_patch4_window7_224", in_chans=4, img_size=64,
                          options={"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]})


@pytest.fixture
def tiny_convnext_config() -> BackboneConfig:
    """timm's smallest ConvNeXt (atto: widths 40/80/160/320, strides 4 to 32) on 4-channel
    64 px slices."""
    return BackboneConfig(name="convnext_atto", in_chans=4, img_size=64)
