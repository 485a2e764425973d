"""optim.anchor_decay: decoupled L2-SP, the backbone pulled back to its starting weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtune.errors import ConfigError
from medtune.trainer import OptimConfig, ScheduleConfig, TrainConfig, train
from medtune.trainer.setup import BackboneAnchor

from .test_layer_decay import Classifier, Images


def trained(tmp_path, steps: int, anchor_decay: float, **optim) -> tuple[dict, dict]:
    """The weights before and after ``steps`` Adam steps of the ViT classifier (same seed)."""
    model = Classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=steps, batch_size=8, grad_clip=None, mixed_precision="no", log_every=1,
                      optim=OptimConfig(name="adam", lr=1e-3, anchor_decay=anchor_decay, **optim),
                      schedule=ScheduleConfig(name="constant"))
    train(model, Images(), cfg, tmp_path)
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_step_ends_lr_x_decay_of_the_way_back_to_the_start(tmp_path):
    """Same seed and batch: the first step's Adam update is the plain run's, then the pull
    p <- p + lr x decay x (p0 - p) with lr 1e-3 and decay 100, a tenth of the way back;
    the head is not the backbone's and is not pulled."""
    before, plain = trained(tmp_path / "plain", 1, 0.0)
    _, pulled = trained(tmp_path / "pulled", 1, 100.0)
    backbone = [n for n in before if n.startswith("backbone.")]
    assert len(backbone) > 10
    for name in backbone:
        expected = plain[name] + 0.1 * (before[name] - plain[name])
        torch.testing.assert_close(pulled[name], expected, rtol=0, atol=1e-7, msg=name)
    moved = (pulled["backbone.model.blocks.0.mlp.fc1.weight"] - before["backbone.model.blocks.0.mlp.fc1.weight"]).abs()
    assert moved.median().item() == pytest.approx(0.9e-3, rel=1e-3)  # Adam's first step (the lr), less a tenth
    torch.testing.assert_close(pulled["head.weight"], plain["head.weight"], rtol=0, atol=0)


def test_a_full_pull_keeps_the_backbone_where_it_started(tmp_path):
    """lr x decay = 1: every step ends at the anchor, so after three steps the backbone is
    its starting weights (to float rounding) while the head trains on; with layer decay
    every layer's own lr scales its pull (0.5 x 0.5 of the way at the top block: not back)."""
    before, after = trained(tmp_path / "full", 3, 1000.0)
    for name in before:
        if name.startswith("backbone."):
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-7, msg=name)
    assert (after["head.weight"] - before["head.weight"]).abs().max() > 1e-3
    before, decayed = trained(tmp_path / "decayed", 1, 1000.0, layer_decay=0.5)
    top = "backbone.model.blocks.3.mlp.fc1.weight"  # lr 0.5e-3: Adam moves it 0.5e-3, the pull takes half back
    moved = (decayed[top] - before[top]).abs()
    assert moved.median().item() == pytest.approx(0.25e-3, rel=1e-3)


def test_anchors_are_the_trainable_backbone_parameters_and_refusals():
    model = Classifier()
    model.backbone.model.patch_embed.requires_grad_(False)
    anchor = BackboneAnchor(model, 1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    held = {names[i] for i in anchor.anchors}
    assert held == {n for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    assert "backbone.model.patch_embed.proj.weight" not in held and "head.weight" not in held
    with pytest.raises(ConfigError, match="optim.anchor_decay: Linear holds no medtune backbone to anchor"):
        BackboneAnchor(nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="optim.anchor_decay must be >= 0"):
        OptimConfig(anchor_decay=-1.0)
    with pytest.raises(ValueError, match="lr x anchor_decay <= 1"):
        OptimConfig(lr=1e-2, anchor_decay=200.0)


class Interrupted(Classifier):
    """The classifier, stopped by a KeyboardInterrupt at its ``fail_at_call``-th forward."""

    def __init__(self, fail_at_call: int) -> None:
        super().__init__()
        self.calls, self.fail_at_call = 0, fail_at_call

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt
        return super().forward(batch)


def test_a_resumed_run_pulls_to_the_fresh_runs_anchors(tmp_path):
    """A run rebuilt as the fresh one was (the same seeded or pretrained weights, as
    ``medtune finetune`` does) and resumed from its step-2 state ends where the run that was
    never stopped ends: the anchors are the starting weights, not the resumed ones."""
    cfg = TrainConfig(max_steps=4, batch_size=8, grad_clip=None, mixed_precision="no", log_every=1, save_every=2,
                      optim=OptimConfig(name="adam", lr=1e-3, anchor_decay=300.0), schedule=ScheduleConfig(name="constant"))
    straight = Classifier()
    train(straight, Images(), cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(Interrupted(fail_at_call=3), Images(), cfg, tmp_path / "stopped")
    resumed = Classifier()
    train(resumed, Images(), cfg, tmp_path / "stopped", resume="latest")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
