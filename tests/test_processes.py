"""Several processes, interruptions: BatchNorm statistics agree across ranks, workers stop
when their launcher is killed (and the run resumes), Ctrl-C and errors print on a line of
their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtune.cli import main
from tests import REPO


@pytest.fixture
def pretrain_flags(tiny_pretrain_overrides) -> list[str]:
    """The tiny pretraining command's flags before ``--data`` (2 steps, saved each step)."""
    return ["--config", str(REPO / "configs" / "demo_pretrain.yaml"), "--set", *tiny_pretrain_overrides,
            "train.max_steps=2", "train.save_every=1", "figure=false"]


BATCHNORM_SCRIPT = """
import json, sys
import torch
from torch import nn
from torch.utils.data import Dataset
from accelerate import PartialState
from medtune.trainer import OptimConfig, TrainConfig, train

class Data(Dataset):
    def __len__(self): return 64
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(3, generator=g) * (1 + i % 5), "y": torch.randn(1, generator=g)}

class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.BatchNorm1d(3), nn.Linear(3, 1)
    def forward(self, batch):
        return {"loss": ((self.out(self.norm(batch["x"])) - batch["y"]) ** 2).mean()}

torch.manual_seed(0)
model = WithBatchNorm()
cfg = TrainConfig(max_steps=5, batch_size=4, log_every=5, mixed_precision="no", optim=OptimConfig(lr=0.01))
train(model, Data(), cfg, sys.argv[1])
rank = PartialState().process_index
stats = {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}
open(f"{sys.argv[1]}/rank{rank}.json", "w").write(json.dumps(stats))
"""


def _launch(script: Path, *args: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *([str(script)] if script else []), *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_every_rank_ends_with_the_same_batchnorm_statistics(tmp_path):
    script = tmp_path / "bn.py"
    script.write_text(BATCHNORM_SCRIPT)
    proc = _launch(script, str(tmp_path), port=29541)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and set(rank0) == {"norm.running_mean", "norm.running_var"}
    assert rank0["norm.running_var"] != [1.0, 1.0, 1.0]  # they did learn statistics


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (the workers of one run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in pids if pid != os.getpid()]


@pytest.mark.slow
def test_workers_stop_when_the_launcher_is_killed_and_the_run_resumes(synth_brats, pretrain_flags, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_brats, data)
    run = tmp_path / "killed_run"
    proc = _launch(None, "-m", "medtune", "pretrain", *pretrain_flags, "train.max_steps=100000", "train.save_every=2",
                   "--data", str(data), "--output", str(run), port=29543)
    deadline = time.time() + 180
    while time.time() < deadline and not list(run.glob("state/step_*/trainer_state.json")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(1)
    workers = _pids_of(str(run))
    workers = [pid for pid in workers if pid != proc.pid]
    assert len(workers) >= 2, workers
    os.kill(proc.pid, 9)  # kill -9 of the launcher alone: its workers are left behind
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and
             "Z" not in (Path(f"/proc/{pid}/stat").read_text().split()[2:3] or [""])[0]]
    assert not alive, f"workers still running 60 s after the launcher died: {alive}"
    saved = json.loads(sorted(run.glob("state/step_*/trainer_state.json"))[-1].read_text())["step"]
    argv = ["pretrain", *pretrain_flags, f"train.max_steps={saved + 1}", "--data", str(data),
            "--output", str(run), "--resume", "latest"]
    assert main(argv) == 0  # the state the workers left resumes (and the lock died with them)


def test_interrupted_and_error_lines_start_their_own_line(monkeypatch, capsys):
    """A Ctrl-C or an error during a progress bar is reported on a line of its own."""
    from tqdm.auto import tqdm

    from medtune.checkpoints import params_cli
    from medtune.errors import DataError

    def interrupted(args):
        bar = tqdm(total=10, desc="train")
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(params_cli, "run", interrupted)
    assert main(["params"]) == 130
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert lines[-1] == "medtune: interrupted"

    def failing(args):
        tqdm(total=10, desc="cache").update(1)
        raise DataError("case 3: broken")

    monkeypatch.setattr(params_cli, "run", failing)
    assert main(["params"]) == 2
    assert capsys.readouterr().err.replace("\r", "\n").splitlines()[-1] == "medtune: error: case 3: broken"
