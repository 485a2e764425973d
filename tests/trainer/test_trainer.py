"""The Accelerate training loop: schedule values, learning, accumulation, resume, 2 processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from medtune.checkpoints.runs import find_latest_state
from medtune.errors import CheckpointError, ConfigError, DataError
from medtune.trainer import (
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    build_loader,
    higher_is_better,
    lr_factor,
    make_accelerator,
    train,
    unused_parameters,
)

from tests import REPO


class Regression(Dataset):
    """y = x . w + 0.5 with a fixed w; items are dicts like medtune's datasets."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


class NoisyRegressor(nn.Module):
    """A linear model with dropout on its input: forward draws random numbers, like masking."""

    def __init__(self, dropout: float = 0.0, fail_at_call: int | None = None) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 16)
        self.out = nn.Linear(16, 1)
        self.dropout = nn.Dropout(dropout)
        self.calls = 0
        self.fail_at_call = fail_at_call

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        pred = self.out(torch.relu(self.hidden(self.dropout(batch["x"])))).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        return {"loss": loss, "abs_error": (pred - batch["y"]).abs().mean()}


def make_model(seed: int = 0, **kwargs) -> NoisyRegressor:
    torch.manual_seed(seed)
    return NoisyRegressor(**kwargs)


def tiny_cfg(**overrides) -> TrainConfig:
    values = dict(
        max_steps=20, batch_size=8, log_every=5, mixed_precision="no",
        optim=OptimConfig(name="adam", lr=0.02), schedule=ScheduleConfig(name="constant"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_auto_precision_defers_to_the_launcher_and_an_explicit_one_wins(monkeypatch, caplog):
    from medtune.trainer import resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert resolve_mixed_precision("auto") == "bf16"
    with caplog.at_level("INFO"):
        assert resolve_mixed_precision("no") == "no"
    assert "train.mixed_precision no from the config (the launcher asked for bf16)" in caplog.text
    assert make_accelerator(tiny_cfg(mixed_precision="auto")).mixed_precision == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp13")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION"):
        resolve_mixed_precision("auto")


def test_lr_factor_hand_values():
    poly = ScheduleConfig(name="poly", warmup_steps=4, power=0.9)
    # warmup (step + 1) / 4, then t = (step - 4) / (10 - 4)
    assert [lr_factor(s, 10, poly) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, poly) == 1.0
    assert lr_factor(7, 10, poly) == pytest.approx(0.5**0.9)  # t = 0.5
    assert lr_factor(9, 10, poly) == pytest.approx((1 / 6) ** 0.9)  # t = 5/6
    cosine = ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert lr_factor(7, 10, cosine) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi/2) = 0
    assert lr_factor(8, 10, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))
    assert lr_factor(5, 10, ScheduleConfig(name="constant", warmup_steps=2)) == 1.0
    assert lr_factor(0, 10, ScheduleConfig(name="poly")) == 1.0  # no warmup: full lr at once


def test_loss_falls_and_lr_follows_schedule(tmp_path):
    schedule = ScheduleConfig(name="poly", warmup_steps=5, power=0.9)
    cfg = tiny_cfg(max_steps=40, log_every=1, schedule=schedule)
    model = make_model()
    result = train(model, Regression(), cfg, tmp_path)

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.2 * first, (first, last)
    # the lr logged at step s is the lr of the s-th update (0-based s - 1)
    for r in records:
        assert r["lr"] == pytest.approx(0.02 * lr_factor(r["step"] - 1, 40, schedule))
    assert result.step == 40 and result.metrics["loss"] == pytest.approx(last)
    assert {"grad_norm", "abs_error", "samples_per_s", "epoch"} <= set(records[-1])
    assert records[-1]["epoch"] == pytest.approx(40 * 8 / 64)


def test_grad_accumulation_equals_larger_batch(tmp_path):
    big = make_model()
    train(big, Regression(), tiny_cfg(max_steps=6, batch_size=8, grad_accum=1, grad_clip=None), tmp_path / "big")
    accumulated = make_model()
    train(accumulated, Regression(), tiny_cfg(max_steps=6, batch_size=4, grad_accum=2, grad_clip=None), tmp_path / "acc")
    start = make_model()
    assert not torch.allclose(big.out.weight.cpu(), start.out.weight)  # it did train
    for (name, a), b in zip(big.state_dict().items(), accumulated.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_after_kill_gives_identical_weights(tmp_path):
    # shuffled data, dropout randomness, accumulation, warmup + cosine: everything must replay
    cfg = tiny_cfg(
        max_steps=12, batch_size=8, grad_accum=2, save_every=6, log_every=2,
        schedule=ScheduleConfig(name="cosine", warmup_steps=3),
    )
    dataset = Regression(n=40)  # 5 batches per epoch: resume lands mid-epoch
    straight = make_model(dropout=0.3)
    train(straight, build_loader(dataset, cfg), cfg, tmp_path / "straight")

    killed_dir = tmp_path / "killed"
    # forward call 2 * 8 + 1 is the first micro-batch of step 9: steps 7-8 are lost
    killed = make_model(dropout=0.3, fail_at_call=17)
    with pytest.raises(KeyboardInterrupt):
        train(killed, build_loader(dataset, cfg), cfg, killed_dir)
    assert find_latest_state(killed_dir).name == "step_0000006"
    assert max(r["step"] for r in read_metrics(killed_dir)) == 8

    resumed = make_model(seed=123, dropout=0.3)  # other init: the state must override it
    result = train(resumed, build_loader(dataset, cfg), cfg, killed_dir, resume="latest")
    assert result.step == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the log of the lost steps was replaced, not duplicated
    assert [r["step"] for r in read_metrics(killed_dir)] == [2, 4, 6, 8, 10, 12]
    losses = lambda run: [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run)]  # noqa: E731
    assert losses(killed_dir) == losses(tmp_path / "straight")
    # keep_last=2: only the two newest states remain
    assert sorted(p.name for p in (killed_dir / "state").iterdir()) == ["step_0000006", "step_0000012"]


def test_evaluate_tracks_best_and_calls_on_best(tmp_path):
    scores = iter([0.5, 0.9, 0.7, 0.95])
    seen_modes: list[bool] = []

    def evaluate(model: nn.Module) -> dict:
        seen_modes.append(model.training)
        return {"score": next(scores)}

    best_calls: list[tuple[float, float]] = []
    model = make_model()
    result = train(
        model, Regression(), tiny_cfg(max_steps=8, eval_every=2), tmp_path,
        evaluate=evaluate, is_better=higher_is_better("score"),
        on_best=lambda m, metrics, step, weights: best_calls.append(
            (metrics["score"], step, m.out.weight.sum().item(), weights["out.weight"].sum().item())
        ),
    )
    assert seen_modes == [False] * 4 and model.training
    assert [c[:2] for c in best_calls] == [(0.5, 2), (0.9, 4), (0.95, 8)]
    assert all(c[2] == c[3] for c in best_calls)  # the full weights handed over are the model's
    assert all(torch.equal(result.state_dict[k], v) for k, v in model.state_dict().items())
    assert result.best_metrics == {"score": 0.95} and result.best_step == 8
    evals = [r for r in read_metrics(tmp_path) if "eval/score" in r]
    assert [(r["step"], r["eval/score"], r.get("eval/is_best")) for r in evals] == [
        (2, 0.5, 1.0), (4, 0.9, 1.0), (6, 0.7, None), (8, 0.95, 1.0)
    ]


def test_unused_parameters_are_found_without_changing_the_model():
    class PartlyUsed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 1)
            self.norm = nn.BatchNorm1d(4)
            self.spare = nn.Linear(4, 1)  # never called

        def forward(self, batch: dict) -> dict:
            return {"loss": self.used(self.norm(batch["x"])).pow(2).mean()}

    model = PartlyUsed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"x": torch.randn(8, 4) * 3 + 1}
    assert unused_parameters(model, batch) == ["spare.weight", "spare.bias"]
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    for key, value in model.state_dict().items():  # BatchNorm running stats restored
        assert torch.equal(value, before[key]), key


def test_bad_inputs_are_reported(tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        train(make_model(), Regression(n=5), tiny_cfg(batch_size=8), tmp_path)
    with pytest.raises(CheckpointError, match="no saved state"):
        train(make_model(), Regression(), tiny_cfg(), tmp_path / "fresh", resume="latest")
    with pytest.raises(ConfigError, match="on_best needs is_better"):
        train(make_model(), Regression(), tiny_cfg(), tmp_path, on_best=lambda m, x, step, weights: None)
    with pytest.raises(ValueError, match="mixed_precision"):
        tiny_cfg(mixed_precision="fp8")


TWO_RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})  # the repository root, which holds the tests package
from accelerate import PartialState
from safetensors.torch import save_file
from tests.trainer.test_trainer import Regression, make_model, tiny_cfg
from medtune.trainer import train

run_dir = sys.argv[1]
# different init per rank (DDP must broadcast rank 0's); PartialState() must not be made
# before the Accelerator, which is what turns ACCELERATE_USE_CPU into a CPU process group
model = make_model(seed=int(os.environ["RANK"]), dropout=0.2)
result = train(model, Regression(n=64), tiny_cfg(max_steps=6, batch_size=4, grad_accum=2, log_every=3), run_dir)
rank = PartialState().process_index
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, f"{{run_dir}}/rank{{rank}}.safetensors")
with open(f"{{run_dir}}/rank{{rank}}.txt", "w") as f:
    f.write(f"{{PartialState().num_processes}} {{result.step}}")
"""


@pytest.mark.slow
def test_two_process_cpu_run_keeps_ranks_identical(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT.format(repo=str(REPO)))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29517", str(script), str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "2 6"
    assert (tmp_path / "rank1.txt").read_text() == "2 6"
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    start = make_model(seed=0).state_dict()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["out.weight"], start["out.weight"])
    # only the main process writes the log; the global batch is 4 x 2 x 2 = 16 samples
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    assert records[-1]["epoch"] == pytest.approx(6 * 2 / 8)  # 8 micro-batches per epoch per rank
