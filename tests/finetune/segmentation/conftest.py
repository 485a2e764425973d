"""Fixtures of the segmentation task's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_segmentation_recipe(tiny_segmenter_args) -> dict:
    """A segmentation recipe (the mapping a ``--config`` YAML file holds) for the CLI on
    ``synth_brats``: 3D crops of 32 x 32 x 4, a third of the cases for validation; the tiny
    ViT (4 blocks, width 192, 4-channel 32 px slices) with Med-Tuning and a 16-channel
    decoder; 3 steps of batch 2, evaluated at steps 2 and 3, saved at step 2. Shared by the
    session: write a changed copy, never change it."""
    side, slices = tiny_segmenter_args["img_size"], tiny_segmenter_args["slices"]
    return {
        "data": {"mode": "3d", "crop_size": [side, side, slices], "val_fraction": 0.34, "num_workers": 0},
        "backbone": {"name": tiny_segmenter_args["backbone"], "in_chans": tiny_segmenter_args["in_chans"],
                     "img_size": side, "options": dict(tiny_segmenter_args["backbone_options"])},
        "adapter": {"method": "med-tuning"},
        "model": {"decoder_options": {"channels": 16}},
        "train": {"max_steps": 3, "batch_size": 2, "eval_every": 2, "log_every": 1, "save_every": 2},
    }
