"""Fixtures of the pretraining tests: a tiny SwinUNETR encoder and the demo recipe shrunk."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_swinunetr_options() -> dict:
    """``backbone.options`` of a tiny ``swinunetr`` encoder: feature size 12 (stage widths
    12, 24, 48, 96, 192), one block and one head per stage; MONAI's default window of 7.
    Shared by the session: change a copy (``dict(tiny_swinunetr_options, ...)``)."""
    return {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


@pytest.fixture(scope="session")
def tiny_pretrain_overrides() -> tuple[str, ...]:
    """``--set`` items that shrink ``configs/demo_pretrain.yaml`` to the 32 x 32 x 16
    ``synth_brats`` volumes: 32 px slices, batches of 4, 3 steps logged each step and saved
    at step 2, FreMAE band radius 3, 2 samples in the reconstruction figure."""
    return (
        "data.img_size=32", "backbone.img_size=32", "train.batch_size=4", "train.max_steps=3",
        "train.log_every=1", "train.save_every=2", "train.optim.lr=1e-3", "objective.radius=3",
        "figure_samples=2",
    )
