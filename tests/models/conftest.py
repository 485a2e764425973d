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


@pytest.fixture
def tiny_transbtsv2_options() -> dict:
    """TransBTSV2 cut to widths 2/4/8/16 with one residual block per level, 8-wide tokens
    (2 heads, attention at 16, MLP at 16), DBMs at half width on the skips of strides 2
    and 4, no dropout: 16^3 crops give a 2^3 token grid."""
    return {"base_channels": 2, "encoder_blocks": [1, 1, 1, 1], "embed_dim": 8, "num_heads": 2,
            "attn_expansion": 2.0, "mlp_ratio": 2.0, "dropout": 0.0, "attn_dropout": 0.0, "dbm_reduction": 2}


@pytest.fixture
def tiny_cga_options() -> dict:
    """CGA U-Net cut to widths 4/8/16/32 with one residual block per level, a 4-wide SAM and
    no stem dropout."""
    return {"base_channels": 4, "encoder_blocks": [1, 1, 1, 1], "attention_channels": 4, "stem_dropout": 0.0}


@pytest.fixture(scope="session")
def generated_batch() -> dict:
    """Two generated BraTS-like crops of 16^3 (``synthesize_case``), z-scored: ``image``
    (2, 4, 16, 16, 16) float32 and ``label`` (2, 16, 16, 16) class indices 0-3. Read only."""
    import numpy as np
    import torch

    from medtune.data.preprocess import zscore_nonzero
    from medtune.data.synth.brats import synthesize_case

    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(2):
        image, label = synthesize_case(rng, (16, 16, 16))
        images.append(torch.from_numpy(zscore_nonzero(image)))
        labels.append(torch.from_numpy(np.searchsorted([0, 1, 2, 4], label)))
    return {"image": torch.stack(images).float(), "label": torch.stack(labels).long()}
