"""Fixtures of the VQA task's tests."""

from __future__ import annotations

import pytest

from medtune.models.text import TextConfig


@pytest.fixture
def tiny_text_config() -> TextConfig:
    """A question encoder: open_clip's ViT-B-16 text tower cut to 1 layer of width 32 with
    2 heads, questions of 16 tokens (start and end included); random weights."""
    return TextConfig(width=32, layers=1, heads=2, context_length=16)
