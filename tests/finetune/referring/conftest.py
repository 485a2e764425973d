"""Fixtures of the referring task's tests: tiny open_clip configs for the model's CLIP."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_clip_config() -> dict:
    """``tiny_clip`` of a ``ReferringModelConfig``: a ViT CLIP with 32-d embeddings; vision
    tower of 32 px images in 8 px patches (4 x 4), width 32, 2 layers, heads of 16; text
    tower of 12 tokens, width 48, 2 heads, 1 layer. (The model config's ``image_size`` and
    ``context_length`` replace its sizes.) Smaller than ``medtune.models.clip.TINY_CLIP``,
    the demo's. A fresh dict per test."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1},
    }


@pytest.fixture
def tiny_resnet_clip_config() -> dict:
    """``tiny_clip`` of a ``ReferringModelConfig`` with a ResNet image tower: 32-d
    embeddings; a modified ResNet of one block per stage, width 8, on 64 px images; text
    tower of 12 tokens, width 32, 2 heads, 1 layer. A fresh dict per test."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
