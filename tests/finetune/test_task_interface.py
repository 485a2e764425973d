"""The task interface: a toy task registered in a few lines runs finetune -> predict ->
export through the CLI; the rules every task shares (run folders, --set precedence,
rank-0 errors) hold for every registered task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from medtune.cli import main
from medtune.finetune import TASKS, Task, TaskData
from medtune.trainer import TrainConfig

from tests import REPO


# --------------------------------------------------------------------------- a toy task


@dataclass
class ToyData:
    root: str | None = None
    samples: int = 64


@dataclass
class ToyConfig:
    data: ToyData = field(default_factory=ToyData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=6, batch_size=8, log_every=2, eval_every=3))


class ToyModel(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, batch):
        return {"loss": nn.functional.mse_loss(self.linear(batch["x"]), batch["y"])}


def toy_samples(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, generator=generator)
    return [{"x": row, "y": row.sum(0, keepdim=True)} for row in x]


class ToyTask(Task):
    name, config_class, best_metric = "toy", ToyConfig, "score"

    def build_data(self, cfg, run_dir):
        return TaskData(train=toy_samples(cfg.data.samples), eval=toy_samples(16, seed=1), derived={"features": 3})

    def build_model(self, cfg, derived, pretrained=True):
        return ToyModel(derived["features"])

    def evaluate(self, model, data, cfg, processes):
        x = torch.stack([s["x"] for s in data.eval])
        y = torch.stack([s["y"] for s in data.eval])
        with torch.no_grad():
            return {"score": -float(nn.functional.mse_loss(model.linear(x), y))}

    def predict(self, loaded, args):
        x = torch.tensor(json.loads(Path(args.input).read_text()))
        with torch.no_grad():
            Path(args.output).write_text(json.dumps(loaded.model.linear(x).flatten().tolist()))
        return 0


@pytest.fixture
def toy_task(monkeypatch):
    task = ToyTask()
    monkeypatch.setitem(TASKS._entries, "toy", task)  # TASKS.register("toy")(task), undone after the test
    return task


def test_a_toy_task_runs_finetune_predict_export_through_the_cli(toy_task, tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    assert main(["finetune", "--task", "toy", "--output", str(run), "--set", "data.samples=32"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "toy" and config["data"]["samples"] == 32 and config["derived"] == {"features": 3}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] in (3, 6) and summary["final"]["score"] < 0
    assert (run / "model.safetensors").is_file() and (run / "best" / "model.safetensors").is_file()

    inputs = tmp_path / "x.json"
    inputs.write_text(json.dumps([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]))
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output", str(tmp_path / "p.json")]) == 0
    assert main(["export", str(run), "--format", "full", "--out", str(export)]) == 0
    assert main(["predict", "--model", str(export), "--input", str(inputs), "--output", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads((tmp_path / "q.json").read_text())
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]


def test_the_toy_run_refuses_a_second_fresh_run_and_resumes(toy_task, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["finetune", "--task", "toy", "--output", str(run), "--set", "train.save_every=3"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(argv + ["train.max_steps=9", "--resume", "latest"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


# --------------------------------------------------------------------------- rules every task shares


def _folder_with_state_only(path: Path) -> Path:
    """What a run killed after its first save leaves: config, metrics, state, no final weights."""
    (path / "state" / "step_0000002").mkdir(parents=True)
    (path / "state" / "step_0000002" / "trainer_state.json").write_text('{"step": 2}')
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("task", ["segmentation", "referring", "vqa", "toy"])
def test_a_crashed_run_is_refused_not_restarted(task, toy_task, tmp_path, capsys):
    """Every task applies the same rule: trained weights *or* state/ need --resume (VQA
    used to restart such a folder and truncate its metrics.jsonl)."""
    run = _folder_with_state_only(tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    data = tmp_path / "no_data_needed"
    assert main(["finetune", "--task", task, "--data", str(data), "--output", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (state)" in err and "--resume latest" in err
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("task", ["segmentation", "referring", "vqa"])
def test_set_wins_over_a_flag_on_the_same_key_in_every_task(task, tmp_path):
    from medtune.cli import build_parser
    from medtune.finetune import get_task
    from medtune.finetune.cli import build_config

    argv = ["finetune", "--task", task, "--data", "flag_root", "--set", "data.root=set_root"]
    args = build_parser("finetune", argv).parse_args(argv)
    assert build_config(get_task(task), args, {}).data.root == "set_root"
    argv = ["finetune", "--task", task, "--data", "flag_root"]
    args = build_parser("finetune", argv).parse_args(argv)
    assert build_config(get_task(task), args, {}).data.root == "flag_root"


def test_every_loader_defaults_to_the_best_checkpoint_and_every_device_to_cuda_when_there_is_one(monkeypatch):
    import inspect

    from medtune.checkpoints.runs import DEFAULT_CHECKPOINT
    from medtune.cli import build_parser
    from medtune.finetune import load_segmenter, load_trained
    from medtune.finetune.weights import resolve_device

    assert DEFAULT_CHECKPOINT == "best"
    assert inspect.signature(load_trained).parameters["which"].default == "best"
    assert inspect.signature(load_segmenter).parameters["which"].default == "best"
    for command in (["predict", "--model", "m", "--input", "i"], ["export", "run", "--format", "full", "--out", "o"]):
        assert build_parser(command[0], command).parse_args(command).checkpoint == "best"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")  # `predict` without --device, for every task
    assert resolve_device("cpu") == torch.device("cpu")


RANK0_ERROR = {
    "segmentation": ["--config", "configs/demo_finetune.yaml"],
    "referring": ["--config", "configs/demo_referring.yaml"],
    "vqa": ["--config", "configs/demo_vqa.yaml"],
}


@pytest.mark.slow
def test_an_error_on_rank_0_ends_every_rank_with_exit_2_for_every_task(tmp_path):
    """Data is built on rank 0 first; when it fails there, every rank reports the same one
    line and exits 2 within seconds (plain main_process_first left the others waiting)."""
    repo = REPO
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    launched = {}
    start = time.perf_counter()
    for port, (task, flags) in zip((29531, 29533, 29535), RANK0_ERROR.items()):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), "-m", "medtune", "finetune", *flags, "--data", str(tmp_path / "missing"),
            "--output", str(tmp_path / task),
        ]
        launched[task] = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for task, proc in launched.items():
        _, err = proc.communicate(timeout=180)
        errors = [line for line in err.splitlines() if line.startswith("medtune: error:")]
        assert proc.returncode != 0, task
        assert len(errors) == 2 and errors[0] == errors[1] and "missing" in errors[0], (task, err[-2000:])
    assert time.perf_counter() - start < 150
