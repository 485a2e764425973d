"""optim.layer_decay: BEiT/MAE layer-wise learning rates, against timm's own grouping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from medtune.errors import ConfigError
from medtune.models.backbones import BackboneConfig, create_backbone
from medtune.trainer import OptimConfig, ScheduleConfig, TrainConfig, train
from medtune.trainer.setup import layer_decay_groups, split_lr_groups


class Classifier(nn.Module):
    """A ViT backbone and a linear head on its last stage: the head plays the decoder."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", in_chans=1, img_size=32,
                                                       options={"depth": depth}))
        self.head = nn.Linear(self.backbone.feature_channels[-1], 2)

    def forward(self, batch: dict) -> dict:
        logits = self.head(self.backbone(batch["image"])[-1].mean(dim=(2, 3)))
        return {"loss": nn.functional.cross_entropy(logits, batch["label"])}


class Images(Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": torch.tensor(i % 2)}


def scales_by_name(model: nn.Module, decay: float) -> dict[str, float]:
    groups = split_lr_groups(model, list(model.parameters()), layer_decay_groups(model, decay))
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["group"].scale if g["group"] else 1.0) for g in groups for p in g["params"]}


def test_layer_scales_are_timms_with_the_decoder_as_the_head():
    from timm.optim import param_groups_layer_decay

    model = Classifier()
    scales = scales_by_name(model, 0.6)
    # hand values: stem 0.6^5, blocks 0..3 at 0.6^4..0.6, the final norm joins the last block
    assert scales["backbone.model.patch_embed.proj.weight"] == pytest.approx(0.6**5)
    assert scales["backbone.model.cls_token"] == pytest.approx(0.6**5)
    assert scales["backbone.model.blocks.0.attn.qkv.weight"] == pytest.approx(0.6**4)
    assert scales["backbone.model.blocks.3.mlp.fc2.bias"] == pytest.approx(0.6)
    assert scales["backbone.model.norm.weight"] == pytest.approx(0.6)
    assert scales["head.weight"] == scales["head.bias"] == 1.0
    # timm's param_groups_layer_decay on the bare network (no head: its last layer at 1.0)
    timm_scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model.backbone.model, layer_decay=0.6)
                  for p in g["params"]}
    for name, p in model.backbone.model.named_parameters():
        assert scales[f"backbone.model.{name}"] == pytest.approx(0.6 * timm_scale[id(p)]), name


def test_one_adam_step_moves_each_layer_by_its_own_rate(tmp_path):
    """Adam's first update is lr * g / (|g| + eps): each weight moves by its group's lr
    (the run's lr x 0.5 per layer below the head)."""
    model = Classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=1, batch_size=8, grad_clip=None, mixed_precision="no", log_every=1,
                      optim=OptimConfig(name="adam", lr=1e-3, layer_decay=0.5), schedule=ScheduleConfig(name="constant"))
    train(model, Images(), cfg, tmp_path)
    expected = {"backbone.model.patch_embed.proj.weight": 1e-3 * 0.5**5, "backbone.model.blocks.0.mlp.fc1.weight":
                1e-3 * 0.5**4, "backbone.model.blocks.3.mlp.fc1.weight": 1e-3 * 0.5, "head.weight": 1e-3}
    for name, lr in expected.items():
        step = (dict(model.named_parameters())[name].detach() - before[name]).abs()
        moved = step[step > 0]
        assert moved.numel() > 0.9 * step.numel(), name
        # |g| near Adam's eps moves a little less; no weight moves more than its rate
        assert moved.median().item() == pytest.approx(lr, rel=1e-3), name
        assert moved.max().item() <= lr * (1 + 1e-4), name


def test_swinunetr_layers_and_refusals():
    swin = create_backbone(BackboneConfig(name="swinunetr", in_chans=1, img_size=32, spatial_dims=2,
                                          options={"feature_size": 12, "depths": [1, 1, 1, 1]}))
    ids = swin.layer_ids()
    assert ids["model.patch_embed.proj.weight"] == 0
    assert {i for n, i in ids.items() if n.startswith("model.layers3")} == {3}
    assert max(ids.values()) == 4
    with pytest.raises(ConfigError, match="holds no medtune backbone"):
        layer_decay_groups(nn.Linear(2, 2), 0.75)
    with pytest.raises(ValueError, match="optim.layer_decay must be in"):
        OptimConfig(layer_decay=1.5)
