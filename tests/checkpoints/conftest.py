"""Fixtures of the checkpoint tests: the tiny ViT's backbone config and a pretraining run of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtune.models import BackboneConfig


@pytest.fixture(scope="module")
def vit_config(tiny_segmenter_args) -> BackboneConfig:
    """The tiny segmenter's ViT (4 blocks, width 192) on 4-channel 32 px slices."""
    return BackboneConfig(name=tiny_segmenter_args["backbone"], in_chans=4, img_size=32,
                          options=dict(tiny_segmenter_args["backbone_options"]))


@pytest.fixture(scope="module")
def pretrain_run(make_pretrain_run, vit_config, tmp_path_factory) -> Path:
    """A FreMAE pretraining run folder of that ViT (random encoder weights, no training)."""
    return make_pretrain_run(tmp_path_factory.mktemp("fremae") / "fremae-vit", vit_config)
