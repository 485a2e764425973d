"""``train.compile``: torch.compile in place gives eager's losses and weights, under eager's names."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from medtune.checkpoints.runs import read_metrics
from medtune.config import from_dict
from medtune.errors import ConfigError
from medtune.trainer import OptimConfig, ScheduleConfig, TrainConfig, train


class Patches(Dataset):
    """Random 2-channel 8 x 8 patches and a per-pixel target (a fixed blur of channel 0)."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, 8, 8, generator=g)
        self.y = torch.nn.functional.avg_pool2d(self.x[:, :1], 3, stride=1, padding=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "target": self.y[i]}


class TinyConvNet(nn.Module):
    """Conv, GELU, dropout (random, as masking is), conv and a pixel loss: small enough to
    compile in seconds on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GELU(), nn.Dropout(0.3), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, batch: dict) -> dict:
        pred = self.body(batch["image"])
        pixel = ((pred - batch["target"]) ** 2).mean()
        return {"loss": pixel, "abs_error": (pred - batch["target"]).abs().mean()}


def run(tmp_path, name: str, compile: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyConvNet()
    cfg = TrainConfig(max_steps=4, batch_size=4, log_every=1, mixed_precision="no", compile=compile,
                      optim=OptimConfig(name="adam", lr=0.01), schedule=ScheduleConfig(name="constant"))
    train(model, Patches(), cfg, tmp_path / name)
    losses = [record["loss"] for record in read_metrics(tmp_path / name)]
    return losses, {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_compiled_training_equals_eager_and_keeps_weight_names(tmp_path):
    eager_losses, eager_weights = run(tmp_path, "eager", compile=False)
    compiled_losses, compiled_weights = run(tmp_path, "compiled", compile=True)
    assert len(compiled_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]  # it trained
    assert list(compiled_weights) == list(eager_weights)  # no "_orig_mod." prefix: eager's files and states
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-5)


class Uncompilable(TinyConvNet):
    def forward(self, batch: dict) -> dict:
        from torch._dynamo.exc import Unsupported

        raise Unsupported("data-dependent control flow in TinyConvNet.forward")


def test_a_model_torch_compile_cannot_handle_names_the_setting(tmp_path):
    cfg = TrainConfig(max_steps=1, batch_size=4, mixed_precision="no", compile=True)
    with pytest.raises(ConfigError, match=r"train\.compile: .*data-dependent control flow.*train\.compile: false"):
        train(Uncompilable(), Patches(), cfg, tmp_path / "run")


def test_compile_mode_is_checked():
    assert from_dict(TrainConfig, {"compile": True, "compile_mode": "max-autotune"}).compile_mode == "max-autotune"
    with pytest.raises((ConfigError, ValueError), match="train.compile_mode must be one of default"):
        from_dict(TrainConfig, {"compile": True, "compile_mode": "fastest"})
