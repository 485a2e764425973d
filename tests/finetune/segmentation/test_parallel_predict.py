"""Prediction in parts: ``--num-parts/--part-id`` (nnU-Net's) and ``accelerate launch``
with 2 CPU processes write every case exactly once, as one process writes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtune.cli import main
from tests import REPO


FAST = ("--overlap", "0")  # windows side by side: the fewest forwards


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def run_and_cases(make_segmentation_run, synth_brats, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    run = make_segmentation_run(tmp_path_factory.mktemp("parts") / "run", "med-tuning")
    cases = sorted(p.name for p in synth_brats.iterdir() if p.is_dir())
    return run, synth_brats, cases


@pytest.fixture(scope="module")
def one_process(run_and_cases, tmp_path_factory) -> Path:
    run, data, _ = run_and_cases
    out = tmp_path_factory.mktemp("one_process")
    assert run_cli("predict", "--model", run, "--input", data, "--output", out, *FAST) == 0
    return out


def label_maps(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_parts_predict_every_case_once_as_one_process_does(run_and_cases, one_process, tmp_path):
    run, data, cases = run_and_cases
    assert len(cases) == 3
    out = tmp_path / "parts"
    assert run_cli("predict", "--model", run, "--input", data, "--output", out, "--num-parts", "2", "--part-id", "0", *FAST) == 0
    assert sorted(label_maps(out)) == [f"{cases[0]}.nii.gz", f"{cases[2]}.nii.gz"]  # cases 0 and 2 of 0, 1, 2
    assert run_cli("predict", "--model", run, "--input", data, "--output", out, "--num-parts", "2", "--part-id", "1", *FAST) == 0
    expected, written = label_maps(one_process), label_maps(out)
    assert sorted(written) == sorted(expected) == [f"{case}.nii.gz" for case in cases]
    for name, labels in expected.items():
        assert np.array_equal(written[name], labels), name


@pytest.mark.parametrize("flags, message", [
    (["--num-parts", "2", "--part-id", "2"], "--part-id must be in 0..1 of --num-parts 2, got 2"),
    (["--num-parts", "2"], "--num-parts and --part-id go together"),
])
def test_a_part_outside_the_parts_is_refused(run_and_cases, tmp_path, capsys, flags, message):
    run, data, _ = run_and_cases
    assert run_cli("predict", "--model", run, "--input", data, "--output", tmp_path / "out", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_launched_processes_write_what_one_process_writes(run_and_cases, one_process, tmp_path):
    run, data, cases = run_and_cases
    out = tmp_path / "launched"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29557",
        "-m", "medtune", "predict", "--model", str(run), "--input", str(data), "--output", str(out), *FAST,
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "part 0 of 0..1: 2 of 3 cases" in done.stderr and "part 1 of 0..1: 1 of 3 cases" in done.stderr
    expected, written = label_maps(one_process), label_maps(out)
    assert sorted(written) == sorted(expected) == [f"{case}.nii.gz" for case in cases]
    for name, labels in expected.items():
        assert np.array_equal(written[name], labels), name
