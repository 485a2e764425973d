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


def test_frozen_backbone_waits_then_trains_on_a_restarted_schedule(tmp_path):
    """optim.freeze_backbone_steps (LP-FT): the backbone keeps its weights through the
    frozen steps while the head trains, then moves by its own warmup's first rate."""
    model = Classifier()
    seen = []

    def snapshot(m: nn.Module) -> dict:
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return {"step": float(len(seen))}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=4, batch_size=8, grad_clip=None, mixed_precision="no", log_every=1, eval_every=1,
                      optim=OptimConfig(name="adam", lr=1e-3, freeze_backbone_steps=2),
                      schedule=ScheduleConfig(name="constant", warmup_steps=2))
    train(model, Images(), cfg, tmp_path, evaluate=snapshot)
    assert len(seen) >= 4
    backbone = [n for n in before if n.startswith("backbone.")]
    assert len(backbone) > 10
    for step in (0, 1):  # after optimizer steps 1 and 2: the backbone as it was, the head moved
        for name in backbone:
            assert torch.equal(seen[step][name], before[name]), (step, name)
        assert not torch.equal(seen[step]["head.weight"], before["head.weight"])
    # step 3 is the backbone's first: its warmup restarts at 1/2 of the lr (the head is past
    # its warmup, at the full rate); Adam's first step after 3 gathered gradients moves most
    # weights by about that rate
    moved = (seen[2]["backbone.model.blocks.0.mlp.fc1.weight"] - seen[1]["backbone.model.blocks.0.mlp.fc1.weight"]).abs()
    assert moved.median().item() == pytest.approx(0.5e-3, rel=0.02)
    assert moved.max().item() <= 0.5e-3 * 1.05
    assert not torch.equal(seen[3]["backbone.model.blocks.3.attn.qkv.weight"], seen[2]["backbone.model.blocks.3.attn.qkv.weight"])


def test_frozen_backbone_factors_combine_with_layer_decay():
    from medtune.trainer.setup import freeze_backbone_groups, group_lr_factors

    model = Classifier()
    groups = freeze_backbone_groups(model, 3, layer_decay_groups(model, 0.5))
    assert all(g.frozen and g.restart == 3 for g in groups)  # the decayed layers, frozen in place
    param_groups = split_lr_groups(model, list(model.parameters()), groups)
    schedule = ScheduleConfig(name="constant", warmup_steps=2)
    factors = group_lr_factors(param_groups, 10, schedule)
    head = next(f for f, g in zip(factors, param_groups) if g["group"] is None)
    top = next(f for f, g in zip(factors, param_groups) if g["group"] is not None and g["group"].scale == 0.5)
    assert [head(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert [top(s) for s in range(6)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    # without layer decay: one group holds every backbone parameter at the run's lr
    alone = freeze_backbone_groups(model, 3, [])
    assert len(alone) == 1 and alone[0].scale == 1.0 and alone[0].frozen
    assert set(alone[0].prefix) == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    with pytest.raises(ConfigError, match="no medtune backbone to freeze"):
        freeze_backbone_groups(nn.Linear(2, 2), 3, [])
    with pytest.raises(ValueError, match="freeze_backbone_steps must be >= 0"):
        OptimConfig(freeze_backbone_steps=-1)


def test_freezing_every_step_is_refused(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=8, mixed_precision="no", optim=OptimConfig(freeze_backbone_steps=2))
    with pytest.raises(ConfigError, match="freeze_backbone_steps 2 leaves none of the 2 steps"):
        train(Classifier(), Images(), cfg, tmp_path)
