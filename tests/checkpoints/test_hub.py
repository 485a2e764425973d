"""Hugging Face Hub folders: what ``--format hub`` writes (files, model card), that they
load from where they land (a moved folder, timm and peft on its ``base/``), the upload's
refusals, and ``hf-hub:`` loading from a local Hub cache (``HF_HOME``, offline), never a download."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medtune.checkpoints.export import export_run
from medtune.errors import ConfigError
from medtune.finetune.segmentation import load_segmenter
from tests import REPO


@pytest.fixture(scope="module")
def pretrain_hub(pretrain_run, tmp_path_factory) -> Path:
    return export_run(pretrain_run, tmp_path_factory.mktemp("hub-exports") / "fremae-hub", "hub")


def test_hub_export_of_a_pretraining_run_is_a_timm_repository_with_a_model_card(pretrain_hub, pretrain_run):
    assert sorted(p.name for p in pretrain_hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((pretrain_hub / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    card = (pretrain_hub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\ntags: [medtune, medical-imaging, pretrain, fremae]\n---")
    for expected in ("| objective | fremae |", "| mask_ratio | 0.25 |", "| name | vit_tiny_patch16_224 |",
                     "| in_chans | 4 |", "| dataset | `MICCAI_BraTS2020_TrainingData` |", "| steps | 3 |",
                     "| learning rate | 0.0005 |", "pretraining loss at step 3 | 0.5 |", "| backbone parameters | ",
                     "| `model.safetensors` |", 'timm.create_model("hf-hub:ORG/NAME", pretrained=True)',
                     "--backbone hf-hub:ORG/NAME"):
        assert expected in card, expected
    assert "/data/BraTS2020" not in card  # the dataset's name, never where it lies
    assert (pretrain_hub / "README.md").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_hub_export_of_a_lora_run_is_self_contained_and_loads_in_medtune_timm_and_peft(
        make_segmentation_run, pretrain_run, vit_config, tmp_path):
    import timm
    from peft import PeftModel

    run = make_segmentation_run(tmp_path / "lora-run", "lora", backbone=pretrain_run, r=4)
    export_run(run, tmp_path / "hub", "hub")
    shutil.move(str(tmp_path / "hub"), str(tmp_path / "uploaded"))  # as if downloaded elsewhere
    hub = tmp_path / "uploaded"
    assert sorted(str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()) == [
        "README.md", "adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors",
        "base/config.json", "base/model.safetensors", "config.json", "head.safetensors"]
    card = (hub / "README.md").read_text()
    assert "library_name: peft" in card and "| method | lora |" in card and "PeftModel.from_pretrained" in card
    assert "| trained: adapter |" in card
    published = [p.read_text() for p in hub.rglob("*") if p.suffix in (".json", ".md")]
    assert not any(str(tmp_path.parent) in text for text in published)  # no path of this machine goes public
    assert json.loads((hub / "config.json").read_text())["backbone"]["pretrained"] == "fremae-vit"

    volume = torch.randn(1, 4, 32, 32, 2)
    with torch.no_grad():
        assert torch.equal(load_segmenter(hub).forward_logits(volume), load_segmenter(run).forward_logits(volume))
    base = timm.create_model(f"local-dir:{hub / 'base'}", pretrained=True).eval()
    model = PeftModel.from_pretrained(base, str(hub)).eval()
    images = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        expected = load_segmenter(run).backbone.model.forward_features(images)
        assert torch.allclose(model.base_model.model.forward_features(images), expected, atol=1e-5)


def test_hub_export_of_a_full_run_is_the_full_export_and_a_card(make_segmentation_run, tmp_path):
    run = make_segmentation_run(tmp_path / "full-run", "full")
    hub = export_run(run, tmp_path / "hub", "hub")
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "load_trained(snapshot_download(" in (hub / "README.md").read_text()


def test_push_to_hub_is_refused_before_anything_is_written(pretrain_run, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        export_run(pretrain_run, tmp_path / "hub", "hub", push_to_hub="org/name")
    with pytest.raises(ConfigError, match="use --format hub, not 'timm'"):
        export_run(pretrain_run, tmp_path / "hub", "timm", push_to_hub="org/name")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    with pytest.raises(ConfigError, match="ORG/NAME"):
        export_run(pretrain_run, tmp_path / "hub", "hub", push_to_hub="no-slash")
    assert list(tmp_path.iterdir()) == []

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            uploads.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    hub = export_run(pretrain_run, tmp_path / "hub", "hub", push_to_hub="org/name")
    assert uploads == [("create", "org/name"), ("upload", "org/name", ["README.md", "config.json", "model.safetensors"])]
    assert 'timm.create_model("hf-hub:org/name"' in (hub / "README.md").read_text()


# --------------------------------------------------------------------------- hf-hub: from the local cache


def put_in_hub_cache(hub_cache: Path, repo: str, files: dict[str, Path]) -> None:
    """``files`` as the snapshot of ``repo``'s ``main`` in a huggingface_hub cache folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


HUB_SCRIPT = """
import json, sys, torch, timm
from safetensors.torch import load_file
from medtune.errors import CheckpointError, ConfigError
from medtune.models import BackboneConfig, create_backbone
from medtune.models.clip import TINY_CLIP, build_clip
from medtune.models.weights import pretrained_section

export, clip_file = sys.argv[1], sys.argv[2]
reference = load_file(export + "/model.safetensors")
# timm itself reads the Hub export from the cache, offline
model = timm.create_model("hf-hub:medtune-test/tiny-fremae", pretrained=True)
assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
# medtune: --backbone hf-hub:... brings the architecture and the weights
section = pretrained_section("hf-hub:medtune-test/tiny-fremae")
assert section["name"] == "vit_tiny_patch16_224" and section["options"] == {"depth": 4}, section
backbone = create_backbone(BackboneConfig(**section))
assert all(torch.equal(backbone.state_dict()["model." + k], v) for k, v in reference.items())
# an open_clip repository with a timm image tower (BiomedCLIP's layout): the tower is a backbone
clip_like = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", in_chans=3, img_size=32,
                                           options={"depth": 4}, pretrained="hf-hub:medtune-test/biomedclip-like"))
tower = torch.load(clip_file, weights_only=True)
assert torch.equal(clip_like.state_dict()["model.blocks.3.mlp.fc2.weight"], tower["visual.trunk.blocks.3.mlp.fc2.weight"])
try:
    build_clip("hf-hub:medtune-test/biomedclip-like")
except ConfigError as exc:
    assert "text tower is a Hugging Face model" in str(exc), exc
else:
    raise AssertionError("a custom text tower must be refused")
# a standard open_clip repository: architecture and weights from the cache
clip, _ = build_clip("hf-hub:medtune-test/tiny-clip", weights="hf-hub:medtune-test/tiny-clip")
saved = load_file(clip_file.replace("open_clip_pytorch_model.bin", "open_clip_model.safetensors"))
assert clip.visual.conv1.weight.shape[-1] == 4 and torch.equal(clip.visual.conv1.weight, saved["visual.conv1.weight"])
# not in the cache: refused, naming the way to get it; nothing is fetched
try:
    create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained="hf-hub:medtune-test/absent"))
except CheckpointError as exc:
    assert "not in the local Hugging Face cache" in str(exc) and "--allow-download" in str(exc), exc
else:
    raise AssertionError("a repository missing from the cache must be refused")
print("ok")
"""


def test_hf_hub_specs_load_from_the_local_cache_offline(pretrain_hub, tmp_path):
    import open_clip
    import timm
    from safetensors.torch import save_file

    hub_cache = tmp_path / "hf" / "hub"
    put_in_hub_cache(hub_cache, "medtune-test/tiny-fremae",
                     {name: pretrain_hub / name for name in ("config.json", "model.safetensors", "README.md")})
    # BiomedCLIP's layout: open_clip_config.json (HF text tower) + visual.trunk.* (timm) and text.* tensors
    tower = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=0).state_dict()
    clip_state = {**{f"visual.trunk.{k}": v for k, v in tower.items()}, "text.transformer.w": torch.zeros(2)}
    torch.save(clip_state, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "biomed.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 512, "vision_cfg": {"timm_model_name": "vit_base_patch16_224"},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"}}}))
    put_in_hub_cache(hub_cache, "medtune-test/biomedclip-like", {
        "open_clip_pytorch_model.bin": tmp_path / "open_clip_pytorch_model.bin",
        "open_clip_config.json": tmp_path / "biomed.json"})
    from medtune.models.clip import TINY_CLIP

    torch.manual_seed(5)
    tiny = open_clip.model.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "tiny.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    put_in_hub_cache(hub_cache, "medtune-test/tiny-clip", {
        "open_clip_model.safetensors": tmp_path / "open_clip_model.safetensors",
        "open_clip_config.json": tmp_path / "tiny.json"})

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(pretrain_hub), str(tmp_path / "open_clip_pytorch_model.bin")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
