"""Backbones: stage shapes per family, config errors, local weight loading and adaptation."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from medtune.checkpoints.io import save_safetensors
from medtune.config import from_dict
from medtune.errors import CheckpointError, ConfigError, DataError
from medtune.models import (
    BACKBONES,
    BackboneConfig,
    backbone_family,
    create_backbone,
    load_pretrained,
    vit_stage_indices,
)
from medtune.models.weights import adapt_conv_in_channels


def stage_shapes(backbone, x):
    return [tuple(stage.shape) for stage in backbone.forward_stages(x)]


def save_weights(state, name, fmt="safetensors"):
    if fmt == "safetensors":
        return save_safetensors(state, f"{name}.safetensors")
    if fmt == "pth":
        torch.save({"state_dict": state}, f"{name}.pth")
        return f"{name}.pth"
    np.savez(f"{name}.npz", **{k: v.numpy() for k, v in state.items()})
    return f"{name}.npz"


def expected_shapes(backbone, batch, spatial):
    return [
        (batch, channels, *(side // stride for side in spatial))
        for channels, stride in zip(backbone.feature_channels, backbone.feature_strides)
    ]


@pytest.fixture(autouse=True)
def _seed_and_tmp(tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)  # weight files are written to the working directory


@pytest.fixture
def tiny_vit_64_config(tiny_vit_config) -> BackboneConfig:
    """The tiny ViT (4 blocks, width 192, 16 px patches, 4 channels) on 64 px slices: 4 x 4 tokens."""
    return dataclasses.replace(tiny_vit_config, img_size=64)


def test_vit_stage_indices_are_last_block_of_each_quarter():
    assert vit_stage_indices(12) == (2, 5, 8, 11)  # the papers' blocks 3/6/9/12
    assert vit_stage_indices(4) == (0, 1, 2, 3)
    assert vit_stage_indices(24) == (5, 11, 17, 23)
    with pytest.raises(ConfigError):
        vit_stage_indices(3)


def test_vit_stages_are_block_outputs_as_maps(tiny_vit_64_config):
    backbone = create_backbone(tiny_vit_64_config).eval()
    assert backbone_family(backbone) == "vit"
    assert backbone.feature_channels == (192,) * 4 and backbone.feature_strides == (16,) * 4
    assert (backbone.num_blocks, backbone.embed_dim, backbone.patch_size) == (4, 192, 16)
    assert backbone.out_indices == (0, 1, 2, 3)
    assert {"model.pos_embed", "model.cls_token"} <= backbone.no_weight_decay()

    block_tokens = []
    hooks = [
        block.register_forward_hook(lambda module, args, out: block_tokens.append(out))
        for block in backbone.model.blocks
    ]
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        stages = backbone(x)
    for hook in hooks:
        hook.remove()
    assert [tuple(s.shape) for s in stages] == [(2, 192, 4, 4)] * 4
    prefix = backbone.model.num_prefix_tokens
    for i, (tokens, stage) in enumerate(zip(block_tokens, stages)):
        if i == len(stages) - 1:  # the last block's output gets the final LayerNorm
            tokens = backbone.model.norm(tokens)
        as_map = tokens[:, prefix:].transpose(1, 2).reshape(2, 192, 4, 4)  # (B, 192, 4, 4)
        torch.testing.assert_close(stage, as_map)
    assert not torch.allclose(stages[-1], block_tokens[-1][:, prefix:].transpose(1, 2).reshape(2, 192, 4, 4))


def test_vit_out_indices_option(tiny_vit_config):
    def vit(out_indices):
        options = {**tiny_vit_config.options, "out_indices": out_indices}
        return create_backbone(dataclasses.replace(tiny_vit_config, options=options))

    backbone = vit([1, -1])
    assert backbone.out_indices == (1, 3)
    assert stage_shapes(backbone, torch.randn(1, 4, 32, 32)) == [(1, 192, 2, 2)] * 2
    with pytest.raises(ConfigError, match="out_indices"):
        vit([4])


@pytest.mark.parametrize(
    "config_fixture, family, channels, strides",
    [
        ("tiny_swin_config", "swin", (24, 48, 96, 192), (4, 8, 16, 32)),
        ("tiny_convnext_config", "convnext", (40, 80, 160, 320), (4, 8, 16, 32)),
    ],
)
def test_hierarchical_timm_stages(config_fixture, family, channels, strides, request):
    backbone = create_backbone(request.getfixturevalue(config_fixture))
    assert backbone_family(backbone) == family
    assert backbone.feature_channels == channels and backbone.feature_strides == strides
    x = torch.randn(2, 4, 64, 64)
    assert stage_shapes(backbone, x) == expected_shapes(backbone, 2, (64, 64))
    assert all(key.startswith("model.") for key in backbone.state_dict())


@pytest.mark.parametrize("spatial_dims, side", [(2, 64), (3, 32)])
def test_swinunetr_encoder_matches_monai(spatial_dims, side):
    from monai.networks.nets import SwinUNETR

    options = {"feature_size": 12}
    cfg = BackboneConfig("swinunetr", img_size=side, spatial_dims=spatial_dims, options=options)
    backbone = create_backbone(cfg).eval()
    assert backbone_family(backbone) == "monai_swin"
    assert backbone.feature_channels == (12, 24, 48, 96, 192)
    assert backbone.feature_strides == (2, 4, 8, 16, 32)
    x = torch.randn(1, 4, *(side,) * spatial_dims)
    assert stage_shapes(backbone, x) == expected_shapes(backbone, 1, (side,) * spatial_dims)

    # the whole SwinUNETR checkpoint loads: only swinViT.* is taken, and outputs agree
    reference = SwinUNETR(4, 3, feature_size=12, spatial_dims=spatial_dims).eval()
    own_keys = {key.removeprefix("model.") for key in backbone.state_dict()}
    assert own_keys == set(reference.swinViT.state_dict())
    report = load_pretrained(backbone, save_weights(reference.state_dict(), f"swinunetr_{spatial_dims}d"))
    assert not report.missing and all(not k.startswith("model.swinViT") for k in report.loaded)
    with torch.no_grad():
        for ours, theirs in zip(backbone(x), reference.swinViT(x, True)):
            torch.testing.assert_close(ours, theirs)


def test_3d_stem_adaptation_repeats_and_rescales():
    weight = torch.randn(6, 1, 2, 2, 2)
    adapted = adapt_conv_in_channels(weight, 4)
    assert adapted.shape == (6, 4, 2, 2, 2)
    torch.testing.assert_close(adapted, weight.repeat(1, 4, 1, 1, 1) / 4)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as info:
        create_backbone(BackboneConfig(name="resnet_not_a_backbone"))
    message = str(info.value)
    assert "resnet_not_a_backbone" in message and "swinunetr" in message and "vit_*" in message
    assert "swinunetr" in BACKBONES and "vit_base_patch16_224" in BACKBONES


def test_config_and_size_errors(tiny_vit_64_config, tiny_swin_config):
    with pytest.raises(ConfigError, match="colour"):
        from_dict(BackboneConfig, {"name": "swinunetr", "colour": 1})
    cfg = from_dict(BackboneConfig, {"name": "swinunetr", "options": {"feature_size": 12}})
    assert cfg.options == {"feature_size": 12} and cfg.pretrained is None
    with pytest.raises(ConfigError, match="spatial_dims"):
        BackboneConfig(spatial_dims=4)
    with pytest.raises(ConfigError, match="backbone.options.heads"):
        create_backbone(BackboneConfig(name="swinunetr", options={"heads": 3}))
    with pytest.raises(ConfigError, match="img_size 100"):
        create_backbone(dataclasses.replace(tiny_swin_config, img_size=100))
    with pytest.raises(ConfigError, match="spatial_dims must be 2"):
        create_backbone(dataclasses.replace(tiny_vit_64_config, spatial_dims=3))
    backbone = create_backbone(tiny_vit_64_config)
    with pytest.raises(DataError, match="img_size=64"):
        backbone(torch.randn(1, 4, 32, 32))
    with pytest.raises(DataError, match="C=4"):
        backbone(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("fmt", ["pth", "npz"])
def test_rgb_timm_vit_adapts_stem_and_pos_embed(fmt, tiny_vit_64_config, caplog):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, num_classes=10)
    source_state = source.state_dict()  # 3 channels, 14x14 grid, a 10-class head
    path = save_weights(source_state, "timm_vit", fmt)

    with caplog.at_level(logging.INFO, logger="medtune"):
        backbone = create_backbone(dataclasses.replace(tiny_vit_64_config, pretrained=str(path)))
    own = backbone.state_dict()

    stem = own["model.patch_embed.proj.weight"]
    source_stem = source_state["patch_embed.proj.weight"]
    torch.testing.assert_close(stem, adapt_input_conv(4, source_stem))
    by_hand = torch.cat([source_stem, source_stem[:, :1]], dim=1) * 3 / 4  # channels r,g,b,r
    torch.testing.assert_close(stem, by_hand)

    assert own["model.pos_embed"].shape == (1, 1 + 4 * 4, 192)
    resampled = resample_abs_pos_embed(source_state["pos_embed"], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(own["model.pos_embed"], resampled)
    cls_position = source_state["pos_embed"][:, 0]
    torch.testing.assert_close(own["model.pos_embed"][:, 0], cls_position)
    block_weight = "blocks.3.mlp.fc2.weight"
    torch.testing.assert_close(own[f"model.{block_weight}"], source_state[block_weight])
    assert "dropping classifier" in caplog.text


def test_timm_swin_tables_follow_smaller_windows(tiny_swin_config):
    options = dict(tiny_swin_config.options)
    source = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, **options
    )
    backbone = create_backbone(tiny_swin_config)
    key = "layers.3.blocks.0.attn.relative_position_bias_table"
    assert source.state_dict()[key].shape == (13 * 13, 4)  # window 7 at 224 px
    assert backbone.state_dict()[f"model.{key}"].shape == (3 * 3, 4)  # clamped to 2 at 64 px
    report = load_pretrained(backbone, save_weights(source.state_dict(), "timm_swin"))
    assert not report.missing
    torch.testing.assert_close(
        backbone.state_dict()["model.layers.0.blocks.0.attn.relative_position_bias_table"],
        source.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"],
    )
    assert backbone.state_dict()["model.patch_embed.proj.weight"].shape[1] == 4


def test_wrong_shape_is_refused_naming_the_tensor(tiny_vit_64_config):
    backbone = create_backbone(tiny_vit_64_config)
    state = backbone.state_dict()
    state["model.blocks.1.attn.qkv.weight"] = torch.zeros(10, 192)
    path = save_weights(state, "broken")
    with pytest.raises(CheckpointError, match=r"model\.blocks\.1\.attn\.qkv\.weight"):
        load_pretrained(create_backbone(tiny_vit_64_config), path)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(backbone, save_weights({"decoder.weight": torch.zeros(3)}, "other"))
    with pytest.raises(CheckpointError, match="has no backbone.safetensors"):
        load_pretrained(backbone, ".")


def test_saved_backbone_reloads_from_run_folder(tiny_vit_64_config):
    cfg = tiny_vit_64_config
    trained = create_backbone(cfg).eval()
    save_safetensors(trained.state_dict(), "run/backbone.safetensors")
    fresh = create_backbone(cfg).eval()
    reloaded = create_backbone(dataclasses.replace(cfg, pretrained="run")).eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        expected, before, after = trained(x), fresh(x), reloaded(x)
    assert not torch.equal(expected[-1], before[-1])
    for ours, theirs in zip(after, expected):
        assert torch.equal(ours, theirs)
