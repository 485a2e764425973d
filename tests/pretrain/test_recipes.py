"""Every pretraining recipe in configs/ loads (its objective section holds only keys of
its own objective), round-trips through config.json, and builds its objective on a tiny
backbone of the recipe's family; switching objective.name leaves a clear error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from medtune.config import from_dict, to_dict
from medtune.errors import ConfigError
from medtune.models import create_backbone
from medtune.pretrain import OBJECTIVES, MAEConfig, build_objective
from medtune.pretrain.config import PretrainConfig, load_pretrain_config

from tests import REPO

CONFIGS = REPO / "configs"
RECIPES = sorted(path for path in CONFIGS.glob("*.yaml") if "objective" in yaml.safe_load(path.read_text()))


@pytest.fixture
def tiny_backbone(tiny_swinunetr_options):
    """``tiny_backbone(cfg)``: the recipe's backbone with its widths and depths cut down
    (swinunetr: the tiny SwinUNETR options; ViT: 4 blocks of width 48 with one head), its
    names, patch sizes, image sizes and channel counts kept: they decide what the
    objective accepts."""
    shrink = {"swinunetr": tiny_swinunetr_options, "vit": {"depth": 4, "embed_dim": 48, "num_heads": 1}}

    def build(cfg: PretrainConfig):
        family = "vit" if cfg.backbone.name.startswith("vit_") else cfg.backbone.name
        options = {**cfg.backbone.options, **shrink[family]}
        options.pop("use_checkpoint", None)
        return create_backbone(dataclasses.replace(cfg.backbone, pretrained=None, options=options))

    return build


def test_every_objective_has_a_recipe():
    names = {yaml.safe_load(path.read_text())["objective"]["name"] for path in RECIPES}
    assert names == set(OBJECTIVES.names())
    assert len(RECIPES) == 9


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_pretraining_recipe_loads_and_builds_its_objective(path: Path, tiny_backbone):
    cfg = load_pretrain_config(path)
    written = yaml.safe_load(path.read_text())["objective"]
    assert type(cfg.objective) is OBJECTIVES.get(written["name"]).config_class
    assert {k: getattr(cfg.objective, k) for k in written} == written  # every key taken as written
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg  # what config.json rebuilds

    torch.manual_seed(0)
    backbone = tiny_backbone(cfg)
    objective = build_objective(cfg.objective, backbone)
    assert objective.backbone is backbone
    if cfg.backbone.spatial_dims == 2:  # a forward at the recipe's size (3D: too slow here)
        images = torch.randn(1, cfg.backbone.in_chans, cfg.backbone.img_size, cfg.backbone.img_size)
        out = objective({"image": images, "foreground": images[:, 0] != 0})
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_switching_objective_name_names_the_keys_of_the_old_objective():
    recipe = CONFIGS / "fremae_swinunetr2d_brats.yaml"
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(recipe, ["objective.name=mae"])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{recipe}: objective.mask_mode, ")
    assert "are not keys of objective 'mae' (" in message
    assert "jitter" in message and "belong to 'fremae'" in message
    assert "radius, filter_kind belong to 'fremae', 'mfm'" in message
    assert message.endswith("; its keys: name, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss")
    # without leftover keys the name alone picks the class, with that objective's defaults
    cfg = load_pretrain_config(None, ["objective.name=mae", "objective.decoder_dim=64"])
    assert cfg.objective == MAEConfig(decoder_dim=64) and cfg.objective.mask_ratio == 0.75
