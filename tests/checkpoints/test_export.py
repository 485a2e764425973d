"""Run-folder formats and exports, on a hand-made run (no training): what each file holds,
how the adapter export finds and checks its base weights, and what refuses to export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medtune.adapters import adapter_state_dict, load_adapter
from medtune.checkpoints.io import load_json, load_weights, save_safetensors
from medtune.errors import CheckpointError, ConfigError
from medtune.finetune.segmentation import build_segmenter, load_segmenter
from medtune.finetune.weights import file_sha256, head_state_dict
from medtune.checkpoints.export import export_run


def logits(model) -> torch.Tensor:
    volume = torch.randn(1, 4, 32, 32, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_logits(volume)


@pytest.fixture(scope="module")
def run(make_segmentation_run, tmp_path_factory) -> Path:
    return make_segmentation_run(tmp_path_factory.mktemp("run"), "med-tuning")


def test_adapter_files_hold_exactly_the_trained_tensors(run):
    model = load_segmenter(run)
    saved = load_weights(run / "adapter.safetensors")
    expected = adapter_state_dict(model.backbone)
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    head = load_weights(run / "head.safetensors")
    assert set(head) == set(head_state_dict(model)) == {k for k in model.state_dict() if k.startswith("decoder.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stored = {f"backbone.{k}" for k in saved} | set(head)
    assert trainable <= stored  # + adapter/decoder buffers (BatchNorm statistics)
    config = load_json(run / "adapter.json")
    assert config["method"] == "med-tuning" and config["backbone"] == "vit_tiny_patch16_224"
    assert config["base_weights"] == {"path": "backbone.safetensors", "sha256": file_sha256(run / "backbone.safetensors")}


def test_the_adapter_export_is_what_the_adapter_loader_reads(run, tmp_path):
    """One adapter format: medtune.adapters.load_adapter reads an export into a fresh adapted backbone."""
    export_run(run, tmp_path / "adapter", "adapter")
    trained = load_segmenter(run)
    fresh = build_segmenter(trained_cfg(run), 4, load_pretrained=False)
    load_adapter(fresh.backbone, tmp_path / "adapter")
    for name, tensor in adapter_state_dict(trained.backbone).items():
        assert torch.equal(adapter_state_dict(fresh.backbone)[name], tensor), name


def trained_cfg(run: Path):
    from medtune.finetune.segmentation.task import TASK
    from medtune.checkpoints.runs import read_run_config

    return TASK.load_config(read_run_config(run).config)


def test_adapter_export_references_base_and_checks_its_sha(run, tmp_path):
    reference = logits(load_segmenter(run))
    export_run(run, tmp_path / "adapter", "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.json", "adapter.safetensors", "config.json", "head.safetensors"]
    recorded = load_json(tmp_path / "adapter" / "adapter.json")["base_weights"]
    assert Path(recorded["path"]) == (run / "backbone.safetensors").resolve()
    assert torch.equal(logits(load_segmenter(tmp_path / "adapter")), reference)

    # base weights changed after export -> refused, naming the file
    moved = tmp_path / "run_copy"
    shutil.copytree(run, moved)
    export_run(moved, tmp_path / "adapter2", "adapter")
    base = load_weights(moved / "backbone.safetensors")
    base["model.pos_embed"] = base["model.pos_embed"] + 1
    save_safetensors(base, moved / "backbone.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        load_segmenter(tmp_path / "adapter2")
    # ... also when given explicitly: same shapes, other values than the adapter was trained on
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_segmenter(tmp_path / "adapter2", base_weights=moved / "backbone.safetensors")
    (moved / "backbone.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "adapter2")
    # an explicit base file with the recorded content is used wherever it lies (here the original one)
    again = load_segmenter(tmp_path / "adapter2", base_weights=run / "backbone.safetensors")
    assert torch.equal(logits(again), reference)


def test_copy_base_makes_a_self_contained_adapter_export(run, tmp_path):
    export_run(run, tmp_path / "adapter", "adapter", copy_base=True)
    assert (tmp_path / "adapter" / "backbone.safetensors").is_file()
    assert load_json(tmp_path / "adapter" / "adapter.json")["base_weights"]["path"] == "backbone.safetensors"
    shutil.move(str(tmp_path / "adapter"), str(tmp_path / "moved"))
    assert torch.equal(logits(load_segmenter(tmp_path / "moved")), logits(load_segmenter(run)))


def test_merged_refusals_and_full_round_trip(run, make_segmentation_run, tmp_path):
    with pytest.raises(ConfigError, match="only LoRA merges"):
        export_run(run, tmp_path / "m", "merged")
    full_run = make_segmentation_run(tmp_path / "full_run", "full")
    with pytest.raises(ConfigError, match="no low-rank update to fold"):
        export_run(full_run, tmp_path / "m2", "merged")
    export_run(run, tmp_path / "full", "full")
    with pytest.raises(CheckpointError, match="no base backbone weights"):
        export_run(tmp_path / "full", tmp_path / "a", "adapter")
    with pytest.raises(ConfigError, match="'torchscript' is not an export format of a segmentation run; "
                                          "this run exports as: full, adapter, hub, onnx"):
        export_run(run, tmp_path / "x", "torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "full_run"]  # refusals leave nothing behind


def test_lora_merge_gives_a_plain_model_with_the_same_outputs(make_segmentation_run, tmp_path):
    lora = make_segmentation_run(tmp_path / "lora_run", "lora")
    reference = logits(load_segmenter(lora))
    export_run(lora, tmp_path / "merged", "merged")
    config = load_json(tmp_path / "merged" / "config.json")
    assert config["adapter"] == {"method": "full"} and config["derived"]["export"]["merged_from"] == "lora"
    keys = set(load_weights(tmp_path / "merged" / "model.safetensors"))
    assert "backbone.model.blocks.0.attn.qkv.weight" in keys and not any("lora" in k for k in keys)
    assert torch.allclose(logits(load_segmenter(tmp_path / "merged")), reference, atol=1e-5)
