"""Weight files: atomic writes, safetensors round trips, loaders whose errors name the file
and the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medtune.checkpoints.io import (
    atomic_write,
    load_json,
    load_state,
    load_trained_state,
    load_weights,
    save_json,
    save_safetensors,
)
from medtune.errors import CheckpointError


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "w.json"
    save_json({"a": 1}, target)

    def broken(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert load_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["w.json"]  # no temp file left behind


def test_safetensors_round_trip_and_shared_storage(tmp_path: Path):
    base = torch.arange(6.0)
    tensors = {"a": base, "b": base.view(2, 3)[:, :2]}  # shared, non-contiguous
    path = save_safetensors(tensors, tmp_path / "m.safetensors", metadata={"step": 3})
    back = load_weights(path)
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base.view(2, 3)[:, :2])


def test_load_weights_errors_name_the_file(tmp_path: Path):
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load_weights(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_weights(bad)
    pt = tmp_path / "w.pth"
    torch.save({"state_dict": {"x": torch.ones(2)}}, pt)
    assert torch.equal(load_weights(pt)["x"], torch.ones(2))


def test_load_state_reports_and_refuses_shape_mismatch():
    model = nn.Linear(3, 2)
    report = load_state(model, {"weight": torch.zeros(2, 3), "extra": torch.ones(1)}, strict=False)
    assert report.loaded == ["weight"] and report.missing == ["bias"] and report.unexpected == ["extra"]
    assert torch.equal(model.weight, torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match="'weight'.*\\(4, 3\\)"):
        load_state(model, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, source="x")
    with pytest.raises(CheckpointError, match="missing 1 keys"):
        load_state(model, {"weight": torch.zeros(2, 3)}, strict=True)


def test_load_trained_state_needs_exactly_the_expected_tensors():
    model = nn.Linear(3, 2)
    report = load_trained_state(model, {"bias": torch.ones(2)}, ["bias"], source="a.safetensors")
    assert report.loaded == ["bias"] and torch.equal(model.bias, torch.ones(2))
    with pytest.raises(CheckpointError, match="'weight' is not a trained tensor"):
        load_trained_state(model, {"bias": torch.ones(2), "weight": torch.ones(2, 3)}, ["bias"])
    with pytest.raises(CheckpointError, match="missing 1 trained tensors \\(first: 'weight'\\)"):
        load_trained_state(model, {"bias": torch.ones(2)}, ["bias", "weight"])
    with pytest.raises(CheckpointError, match="'bias' has shape \\(3,\\)"):
        load_trained_state(model, {"bias": torch.ones(3)}, ["bias"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_weight_and_config_files_get_the_permissions_of_the_umask(tmp_path: Path, umask: int):
    """0644 under a 022 umask (not mkstemp's private 0600), 0600 under 077; no temporary left."""
    import os

    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        save_json({"a": 1}, tmp_path / "config.json")
        atomic_write(tmp_path / "card.md", lambda tmp: tmp.write_text("# card"))
    finally:
        os.umask(previous)
    for name in ("w.safetensors", "config.json", "card.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md", "config.json", "w.safetensors"]
