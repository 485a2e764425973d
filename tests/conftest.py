"""Fixtures shared by every folder: a tiny generated BraTS dataset, written once per test
session, and the tiny ViT that segmentation and pretraining tests build on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # medtune.models imports timm: only the tests that build a model pay for it
    from medtune.models import BackboneConfig


@pytest.fixture(scope="session")
def synth_brats(tmp_path_factory) -> Path:
    """Root of a 3-case synthetic BraTS-2020-style dataset, volumes 32x32x16.

    Case folders ``BraTS20_Training_00{1,2,3}/`` with ``*_{flair,t1,t1ce,t2,seg}.nii.gz``,
    labels in {0, 1, 2, 4}. Treat it as read-only: it is shared by every test.
    """
    from medtune.data.synth import synthesize_brats

    root = tmp_path_factory.mktemp("synth_brats")
    synthesize_brats(root, cases=3, shape=(32, 32, 16), seed=0)
    return root


def _tiny_vit() -> BackboneConfig:
    from medtune.models import BackboneConfig

    return BackboneConfig(name="vit_tiny_patch16_224", in_chans=4, img_size=32, options={"depth": 4})


@pytest.fixture
def tiny_vit_config() -> BackboneConfig:
    """timm's ViT-Tiny cut to 4 blocks (width 192, 3 heads, 16 px patches; each block's
    output is one of its 4 feature stages) on 4-channel 32 px slices: 2 x 2 tokens. A fresh
    config per test; change sizes with ``dataclasses.replace``."""
    return _tiny_vit()


@pytest.fixture(scope="session")
def tiny_segmenter_args() -> dict:
    """Keyword arguments of ``medtune.checkpoints.params.segmentation_config`` (and of
    ``compare_methods``, less ``method``): the tiny ViT (4 blocks, width 192) on 4-channel
    32 px slices, crops of 4 slices, a decoder of 8 channels. Shared by the session: read
    it, change a copy (``{**tiny_segmenter_args, "slices": 2}``)."""
    vit = _tiny_vit()
    return dict(backbone=vit.name, in_chans=vit.in_chans, img_size=vit.img_size, slices=4,
                backbone_options=vit.options, decoder_options={"channels": 8})
