"""Shared fixtures: a tiny generated BraTS dataset, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


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
