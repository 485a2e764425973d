"""Exports other tools load, checked with the tools themselves: timm (strict loading, the
same features), peft (``PeftModel.from_pretrained`` on the plain timm backbone), MONAI
(``SwinUNETR.swinViT.load_state_dict(strict=True)``); medtune's own adapter names for
the methods peft does not have; and the refusals, which leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.checkpoints.export import export_run
from medtune.errors import CheckpointError, ConfigError
from medtune.finetune.segmentation import load_segmenter
from medtune.models import BackboneConfig, create_backbone

IMAGES = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def timm_export(pretrain_run, tmp_path_factory) -> Path:
    return export_run(pretrain_run, tmp_path_factory.mktemp("exports") / "timm", "timm")


@pytest.fixture(scope="module")
def lora_run(make_segmentation_run, pretrain_run, tmp_path_factory) -> Path:
    """LoRA finetuning of the pretraining run's encoder (the base is that encoder)."""
    return make_segmentation_run(tmp_path_factory.mktemp("lora") / "run", "lora", backbone=pretrain_run, r=4)


def timm_model(export: Path, vit_config: BackboneConfig):
    """What a timm user writes: the architecture by name, the file, M channels, S pixels."""
    import timm

    return timm.create_model(
        vit_config.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")),
        in_chans=4, img_size=32, num_classes=0, **vit_config.options,
    ).eval()


def test_timm_export_loads_in_timm_with_nothing_missing_or_unexpected(pretrain_run, timm_export, vit_config):
    import timm

    assert sorted(p.name for p in timm_export.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((timm_export / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert (config["in_chans"], config["img_size"]) == (4, 32)
    assert config["model_args"] == {"in_chans": 4, "num_classes": 0, "img_size": 32, "depth": 4}
    assert config["pretrained_cfg"]["input_size"] == [4, 32, 32]
    assert config["medtune"]["backbone"]["name"] == "vit_tiny_patch16_224"
    umask = os.umask(0)
    os.umask(umask)
    for path in timm_export.iterdir():  # the umask's permissions (0644 under 022), not mkstemp's private 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path

    fresh = timm.create_model(vit_config.name, in_chans=4, img_size=32, num_classes=0, **vit_config.options)
    report = fresh.load_state_dict(load_file(str(timm_export / "model.safetensors")), strict=False)
    assert not report.missing_keys and not report.unexpected_keys

    encoder = create_backbone(vit_config)
    encoder.load_state_dict(load_file(str(pretrain_run / "backbone.safetensors")))
    encoder.eval()
    for model in (timm_model(timm_export, vit_config),
                  timm.create_model(f"local-dir:{timm_export}", pretrained=True).eval()):  # model_args from config.json
        for name, tensor in encoder.model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
        with torch.no_grad():
            assert torch.equal(model.forward_features(IMAGES), encoder.model.forward_features(IMAGES))


def test_medtune_reads_a_timm_export_back_as_a_backbone(timm_export, vit_config):
    from medtune.models.weights import pretrained_section

    section = pretrained_section(timm_export)
    assert section["name"] == vit_config.name and section["options"] == {"depth": 4}
    loaded = create_backbone(BackboneConfig(**section))
    reference = load_file(str(timm_export / "model.safetensors"))
    assert all(torch.equal(loaded.state_dict()[f"model.{k}"], v) for k, v in reference.items())


def test_lora_adapter_export_is_a_peft_folder_peft_loads_into_the_timm_backbone(lora_run, timm_export, vit_config,
                                                                                tmp_path):
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    export = export_run(lora_run, tmp_path / "lora-adapter", "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter.json", "adapter.safetensors",
            "head.safetensors", "config.json"} == {p.name for p in export.iterdir()}
    peft_config = PeftConfig.from_pretrained(str(export))
    assert peft_config.peft_type == "LORA" and peft_config.r == 4 and peft_config.lora_alpha == 16
    assert set(peft_config.target_modules) == {"qkv", "attn.proj", "fc1", "fc2"}
    saved = load_file(str(export / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in saved
    assert all(".lora_" in k and "head" not in k and "decoder" not in k for k in saved)

    medtune_backbone = load_segmenter(lora_run).backbone  # medtune's own model
    base = timm_model(timm_export, vit_config)  # the base: the pretraining run's encoder
    with torch.no_grad():
        without_lora = base.forward_features(IMAGES)
    model = PeftModel.from_pretrained(base, str(export)).eval()
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    with torch.no_grad():
        features = model.base_model.model.forward_features(IMAGES)
        expected = medtune_backbone.model.forward_features(IMAGES)
    assert not torch.allclose(features, without_lora, atol=1e-4)  # the adapter changes the features ...
    assert torch.allclose(features, expected, atol=1e-5)          # ... exactly as medtune's LoRA does

    # the task head is beside it, and medtune still reads the whole model from the export
    assert set(load_file(str(export / "head.safetensors"))) == {
        k for k in load_segmenter(lora_run).state_dict() if k.startswith("decoder.")}
    volume = torch.randn(1, 4, 32, 32, 2)
    with torch.no_grad():
        assert torch.equal(load_segmenter(export).forward_logits(volume), load_segmenter(lora_run).forward_logits(volume))


def test_methods_peft_lacks_keep_medtune_names_and_the_readme_snippet_loads_them(make_segmentation_run, tmp_path):
    run = make_segmentation_run(tmp_path / "run", "med-tuning")
    export = export_run(run, tmp_path / "medtuning", "adapter", copy_base=True)
    assert not (export / "adapter_config.json").exists() and not (export / "adapter_model.safetensors").exists()

    # the README's snippet, with export = "exports/medtuning"
    import json as json_module

    from medtune.adapters import apply_adapter, load_adapter, load_base_state, read_adapter_config
    from medtune.checkpoints.io import load_weights

    section = json_module.load(open(export / "config.json"))["backbone"]
    backbone = create_backbone(BackboneConfig(**{**section, "pretrained": None}))
    apply_adapter(backbone, read_adapter_config(export)[0])
    load_base_state(backbone, load_weights(export / "backbone.safetensors"))
    load_adapter(backbone, export)

    trained = load_segmenter(run).backbone
    for name, tensor in trained.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name


def test_lora_with_trained_extras_is_refused_as_a_peft_folder(make_segmentation_run, tmp_path):
    run = make_segmentation_run(tmp_path / "run", "lora", trainable_extras=["norm.*"])
    with pytest.raises(ConfigError, match=r"trainable_extras \('norm.weight'.*export 'merged' or 'full'.*"
                                          r"exports as: full, merged, timm, hub, onnx"):
        export_run(run, tmp_path / "adapter", "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_timm_export_of_a_lora_run_is_the_merged_backbone(lora_run, vit_config, tmp_path):
    export = export_run(lora_run, tmp_path / "timm", "timm")
    model = timm_model(export, vit_config)
    with torch.no_grad():
        expected = load_segmenter(lora_run).backbone.model.forward_features(IMAGES)
        assert torch.allclose(model.forward_features(IMAGES), expected, atol=1e-5)


@pytest.fixture(scope="module")
def swinunetr_run(make_pretrain_run, tmp_path_factory) -> Path:
    config = BackboneConfig(name="swinunetr", in_chans=4, img_size=32, spatial_dims=2,
                            options={"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
    return make_pretrain_run(tmp_path_factory.mktemp("fremae") / "fremae-swinunetr", config)


def test_monai_export_loads_into_swinunetr_strictly(swinunetr_run, tmp_path):
    from monai.networks.nets import SwinUNETR

    export = export_run(swinunetr_run, tmp_path / "monai", "monai")
    config = json.loads((export / "config.json").read_text())
    assert config["network"] == "monai.networks.nets.SwinUNETR" and config["load_into"] == "swinViT"
    net = SwinUNETR(**config["kwargs"], out_channels=3).eval()
    net.swinViT.load_state_dict(load_file(str(export / "model.safetensors")), strict=True)

    encoder = create_backbone(BackboneConfig(**{**json.loads((swinunetr_run / "config.json").read_text())["backbone"]}))
    encoder.load_state_dict(load_file(str(swinunetr_run / "backbone.safetensors")))
    encoder.eval()
    with torch.no_grad():
        for ours, monai in zip(encoder.forward_stages(IMAGES), net.swinViT(IMAGES, True)):
            assert torch.equal(ours, monai)


def test_formats_that_cannot_hold_the_run_are_refused_naming_the_supported_ones(swinunetr_run, make_segmentation_run, tmp_path):
    with pytest.raises(ConfigError, match=r"the backbone 'swinunetr' is MONAI's, not timm's; "
                                          r"this run exports as: monai, hub"):
        export_run(swinunetr_run, tmp_path / "t", "timm")
    with pytest.raises(ConfigError, match=r"exports its encoder only.*this run exports as: monai, hub"):
        export_run(swinunetr_run, tmp_path / "t", "adapter")
    full = make_segmentation_run(tmp_path / "full", "full")
    with pytest.raises(ConfigError, match=r"full finetuning trains every backbone tensor.*"
                                          r"this run exports as: full, timm, hub, onnx"):
        export_run(full, tmp_path / "a", "adapter")
    medtuning = make_segmentation_run(tmp_path / "medtuning", "med-tuning")
    with pytest.raises(ConfigError, match=r"'med-tuning' adds modules.*plain timm/MONAI network"):
        export_run(medtuning, tmp_path / "t", "timm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "medtuning"]


def test_a_file_whose_keys_match_nothing_is_refused_not_trained_from_random_weights(lora_run, vit_config, tmp_path):
    from medtune.models.weights import load_pretrained

    peft_file = export_run(lora_run, tmp_path / "adapter", "adapter") / "adapter_model.safetensors"
    with pytest.raises(CheckpointError, match="no tensor matches backbone 'VisionTransformer'.*base_model"):
        load_pretrained(create_backbone(vit_config), peft_file)
    buffers_only = tmp_path / "buffers.safetensors"  # a Swin's index tables match, no weight does
    from medtune.checkpoints.io import save_safetensors

    swin = create_backbone(BackboneConfig(name="swin_tiny_patch4_window7_224", in_chans=4, img_size=32,
                                          options={"depths": [1, 1, 1, 1], "embed_dim": 24, "num_heads": [1, 1, 1, 1]}))
    save_safetensors({k: v for k, v in swin.state_dict().items() if "index" in k or "mask" in k}, buffers_only)
    with pytest.raises(CheckpointError, match="no tensor matches .*none of its weights"):
        load_pretrained(swin, buffers_only)


def test_the_export_command_writes_a_pretraining_runs_encoder(pretrain_run, tmp_path, capsys):
    from medtune.cli import main

    assert main(["export", str(pretrain_run), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    assert capsys.readouterr().out.strip().endswith("timm: config.json, model.safetensors")
