"""Fixtures of the pretraining tests: a tiny SwinUNETR encoder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_swinunetr_options() -> dict:
    """``backbone.options`` of a tiny ``swinunetr`` encoder: feature size 12 (stage widths
    12, 24, 48, 96, 192), one block and one head per stage; MONAI's default window of 7.
    Shared by the session: change a copy (``dict(tiny_swinunetr_options, ...)``)."""
    return {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
