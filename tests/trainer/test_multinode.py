"""Two "nodes" on one machine, each with its own disk (its own working folder): with
``train.shared_filesystem: false`` every node's first process builds its own cache and
writes its own resumable states, so ``--resume latest`` works on both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO


def _launch_both(nodes: list[Path], argv: list[str], port: int) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
             "-m", "medtune", *argv],
            cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank, node in enumerate(nodes)
    ]
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"node {rank}: {err[-3000:]}"


@pytest.mark.slow
def test_node_local_disks_each_keep_their_state_and_resume(synth_brats, tiny_pretrain_overrides, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    argv = ["pretrain", "--config", str(REPO / "configs" / "demo_pretrain.yaml"), "--data", str(synth_brats),
            "--output", "run", "--set", *tiny_pretrain_overrides, "train.batch_size=2", "train.max_steps=2",
            "train.save_every=2", "train.keep_last=1", "figure=false", "train.shared_filesystem=false"]
    _launch_both(nodes, argv, port=29581)
    for node in nodes:  # each node wrote the state and built the cache on its own disk
        assert (node / "run" / "state" / "step_0000002" / "trainer_state.json").is_file(), node
        assert any((node / ".cache").iterdir()), node
    assert (nodes[0] / "run" / "backbone.safetensors").is_file()  # the weights: written once, on the first node
    assert not (nodes[1] / "run" / "backbone.safetensors").exists()
    _launch_both(nodes, [*argv, "train.max_steps=3", "--resume", "latest"], port=29583)
    for node in nodes:
        assert [p.name for p in (node / "run" / "state").iterdir()] == ["step_0000003"], node
