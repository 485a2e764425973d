"""``medtune pretrain`` end to end on generated data, resume, and every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medtune.checkpoints.io import load_state, save_safetensors
from medtune.cli import main
from medtune.checkpoints.runs import read_run_config
from medtune.config import from_dict
from medtune.models import BackboneConfig, create_backbone
from medtune.pretrain.config import PretrainConfig, load_pretrain_config

from tests import REPO

DEMO_CONFIG = REPO / "configs" / "demo_pretrain.yaml"


@pytest.fixture(scope="module")
def pretrain(tiny_pretrain_overrides):
    """``pretrain(data, output, *extra)``: ``medtune pretrain`` of the demo recipe shrunk by
    ``tiny_pretrain_overrides``; ``extra`` --set items come after them, so they win."""

    def run(data: Path, output: Path, *extra: str, config: Path = DEMO_CONFIG) -> int:
        return main(["pretrain", "--config", str(config), "--data", str(data), "--output", str(output),
                     "--set", *tiny_pretrain_overrides, *extra])

    run.overrides = tiny_pretrain_overrides
    return run


def error_line(capsys) -> str:
    """The one error line on stderr (progress bars aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    assert lines[0].startswith("medtune: error: "), lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(pretrain, synth_brats, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert pretrain(synth_brats, run_dir) == 0
    return run_dir


def test_pretrain_writes_a_loadable_run_folder(finished_run, synth_brats, tiny_pretrain_overrides):
    run_dir = finished_run
    for name in ("config.json", "backbone.safetensors", "pretrain.safetensors", "reconstruction.png", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "reconstruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # config.json is the full resolved config: it rebuilds the run's config and backbone
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task"] == "pretrain"
    plan = saved["derived"]["data_plan"]  # what the data decided: the training grid, the intensities
    assert plan["axcodes"] == "RAS" and plan["spacing"] == [1.0, 1.0, 1.0]
    assert [n["scheme"] for n in plan["normalization"]] == ["zscore"] * 4
    resolved = read_run_config(run_dir).config
    cfg = from_dict(PretrainConfig, resolved)
    data_root = f"data.root={json.dumps(str(synth_brats))}"
    assert cfg == load_pretrain_config(DEMO_CONFIG, [*tiny_pretrain_overrides, data_root])
    assert cfg.backbone.img_size == 32 and cfg.train.max_steps == 3

    torch.manual_seed(1)
    backbone = create_backbone(from_dict(BackboneConfig, resolved["backbone"]))
    fresh = {k: v.clone() for k, v in backbone.state_dict().items()}
    encoder = load_file(str(run_dir / "backbone.safetensors"))
    report = load_state(backbone, encoder, strict=True)
    assert not report.missing and not report.unexpected
    changed = [k for k in encoder if not torch.equal(encoder[k], fresh[k])]
    assert "model.patch_embed.proj.weight" in changed  # it trained (and was not re-initialised)

    # pretrain.safetensors = encoder (same tensors, under backbone.) + decoder
    whole = load_file(str(run_dir / "pretrain.safetensors"))
    for key, tensor in encoder.items():
        assert torch.equal(whole[f"backbone.{key}"], tensor), key
    assert any(key.startswith("decoder.") for key in whole)

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert {"loss_high", "loss_low", "mask_ratio", "lr", "samples_per_s"} <= set(records[0])
    # the held-out case's band losses next to a zero prediction, once at the end
    (heldout,) = [r for r in lines if "eval/loss" in r]
    assert heldout["step"] == 3
    for band in ("high", "low"):
        ratio = heldout[f"eval/loss_{band}"] / heldout[f"eval/zero_{band}"]
        assert heldout[f"eval/{band}_ratio"] == pytest.approx(ratio) and heldout[f"eval/zero_{band}"] > 0


def test_rerun_refuses_a_finished_run_and_keeps_its_weights(pretrain, finished_run, synth_brats, capsys):
    before = {name: digest(finished_run / name) for name in ("backbone.safetensors", "pretrain.safetensors")}
    assert pretrain(synth_brats, finished_run) == 2
    line = error_line(capsys)
    assert str(finished_run) in line and "--resume" in line
    assert {name: digest(finished_run / name) for name in before} == before


def test_resume_latest_continues_a_run(pretrain, tiny_pretrain_overrides, synth_brats, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert pretrain(synth_brats, run_dir, "train.max_steps=2") == 0
    first = load_file(str(run_dir / "backbone.safetensors"))
    assert main(["pretrain", "--config", str(DEMO_CONFIG), "--data", str(synth_brats), "--output", str(run_dir),
                 "--resume", "latest", "--set", *tiny_pretrain_overrides, "train.max_steps=4"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]  # the end of each part
    second = load_file(str(run_dir / "backbone.safetensors"))
    assert not torch.equal(first["model.patch_embed.proj.weight"], second["model.patch_embed.proj.weight"])
    out = capsys.readouterr().out
    assert "backbone.safetensors" in out
    last = out.strip().splitlines()[-1]  # the run's last line: held-out bands against a zero prediction
    assert last.startswith("held-out loss on ") and "high band" in last and "zero prediction" in last


@pytest.mark.slow
def test_a_streamed_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(pretrain, synth_brats, tmp_path):
    # data.stream: 3 cases x 4 slices = 3 batches of 4 an epoch; the state of step 2 lies mid-epoch
    stream = ("data.stream=true", "data.samples_per_volume=4", "data.stream_buffer=6", "figure=false")
    assert pretrain(synth_brats, tmp_path / "straight", *stream, "train.max_steps=4", "train.keep_last=2") == 0
    # the same run stopped after its save at step 2: its folder less what came later
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "state" / "step_0000004")
    for name in ("pretrain.safetensors", "backbone.safetensors"):
        (tmp_path / "resumed" / name).unlink()
    assert main(["pretrain", "--config", str(DEMO_CONFIG), "--data", str(synth_brats), "--output",
                 str(tmp_path / "resumed"), "--resume", "latest", "--set", *pretrain.overrides, *stream,
                 "train.max_steps=4"]) == 0
    straight, resumed = (load_file(str(tmp_path / run / "pretrain.safetensors")) for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert not (tmp_path / ".cache").exists()  # nothing was cached


# --------------------------------------------------------------------------- bad inputs


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "data"))


def _first_case(root: Path) -> Path:
    return sorted(p for p in root.iterdir() if p.is_dir())[0]


def _rewrite(path: Path, change) -> None:
    image = nib.load(str(path))
    data = change(np.asarray(image.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(data, image.affine), str(path))


def missing_modality(root: Path) -> str:
    target = next(_first_case(root).glob("*_t1.nii.gz"))
    target.unlink()
    return _first_case(root).name


def shape_mismatch(root: Path) -> str:
    target = next(_first_case(root).glob("*_t2.nii.gz"))
    _rewrite(target, lambda a: a[:-2])
    return _first_case(root).name


def nan_voxels(root: Path) -> str:
    target = next(_first_case(root).glob("*_flair.nii.gz"))

    def poison(a):
        a[10, 10, 5] = np.nan
        return a

    _rewrite(target, poison)
    return _first_case(root).name


def corrupt_file(root: Path) -> str:
    target = next(_first_case(root).glob("*_t1ce.nii.gz"))
    target.write_bytes(b"\x1f\x8b\x08\x00 definitely not a NIfTI volume")
    return target.name


def empty_folder(root: Path) -> str:
    for case in [p for p in root.iterdir() if p.is_dir()]:
        shutil.rmtree(case)
    return str(root)


@pytest.mark.parametrize("damage", [missing_modality, shape_mismatch, nan_voxels, corrupt_file, empty_folder])
def test_bad_data_is_one_line_and_exit_2(damage, pretrain, synth_brats, tmp_path, capsys):
    data = _copy(synth_brats, tmp_path)
    named = damage(data)
    run_dir = tmp_path / "run"
    assert pretrain(data, run_dir) == 2
    line = error_line(capsys)
    assert named in line, line
    assert not (run_dir / "backbone.safetensors").exists()


def test_failed_resume_keeps_the_weights_of_a_finished_run(finished_run, tiny_pretrain_overrides, synth_brats, tmp_path,
                                                            capsys):
    before = digest(finished_run / "backbone.safetensors")
    data = _copy(synth_brats, tmp_path)
    corrupt_file(data)
    code = main(["pretrain", "--config", str(DEMO_CONFIG), "--data", str(data), "--output", str(finished_run),
                 "--resume", "latest", "--set", *tiny_pretrain_overrides, "train.max_steps=5"])
    assert code == 2
    assert "t1ce" in error_line(capsys)
    assert digest(finished_run / "backbone.safetensors") == before


def test_unknown_config_key_is_named(pretrain, synth_brats, tmp_path, capsys):
    assert pretrain(synth_brats, tmp_path / "run", "train.max_stepz=3") == 2
    line = error_line(capsys)
    assert "train.max_stepz" in line and "demo_pretrain.yaml" in line
    assert not (tmp_path / "run").exists()


def test_keys_of_another_objective_are_named(pretrain, synth_brats, tmp_path, capsys):
    # the demo recipe's FreMAE keys (and the tiny overrides' objective.radius) do not fit MAE
    assert pretrain(synth_brats, tmp_path / "run", "objective.name=mae") == 2
    line = error_line(capsys)
    assert "demo_pretrain.yaml: objective.decoder_width, objective.radius are not keys of objective 'mae'" in line
    assert "(decoder_width belongs to 'fremae'; radius belongs to 'fremae', 'mfm')" in line
    assert not (tmp_path / "run").exists()


def test_inconsistent_sections_are_named(pretrain, synth_brats, tmp_path, capsys):
    assert pretrain(synth_brats, tmp_path / "run", "backbone.img_size=64") == 2
    line = error_line(capsys)
    assert "data.img_size" in line and "backbone.img_size" in line


def test_pretrained_checkpoint_of_another_architecture_is_refused(pretrain, synth_brats, tmp_path, capsys):
    other = create_backbone(BackboneConfig(name="vit_small_patch16_224", img_size=32, options={"depth": 4}))
    weights = save_safetensors(other.state_dict(), tmp_path / "vit_small.safetensors")
    assert pretrain(synth_brats, tmp_path / "run", f"backbone.pretrained={weights}") == 2
    line = error_line(capsys)
    assert "vit_small.safetensors" in line and "shape" in line
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_resume_without_state_is_refused(synth_brats, tmp_path, capsys):
    assert main(["pretrain", "--config", str(DEMO_CONFIG), "--data", str(synth_brats),
                 "--output", str(tmp_path / "nothing"), "--resume", "latest"]) == 2
    assert "no saved state" in error_line(capsys)


@pytest.mark.slow
def test_two_process_accelerate_launch(synth_brats, tiny_pretrain_overrides, tmp_path):
    """The command the demo runs: two synchronised CPU processes through Accelerate."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    # PYTHONPATH: the processes run in tmp_path and must import this checkout's medtune
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
        "-m", "medtune", "pretrain", "--config", str(DEMO_CONFIG), "--data", str(synth_brats),
        "--output", str(run_dir), "--set", *tiny_pretrain_overrides, "train.batch_size=2", "figure=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("encoder weights") == 1  # printed by the main process only
    assert (run_dir / "backbone.safetensors").is_file() and not (run_dir / "reconstruction.png").exists()
    state = run_dir / "state" / "step_0000003"
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    records = [r for r in records if "loss" in r]
    # an epoch is the dataset cut into batches of 2, shared by the 2 processes
    from medtune.data.config import build_pretrain_holdout

    data_root = f"data.root={json.dumps(str(synth_brats))}"
    cfg = load_pretrain_config(DEMO_CONFIG, [*tiny_pretrain_overrides, data_root])
    slices = len(build_pretrain_holdout(cfg.data, run_dir, show_progress=False)[0])  # one case held out
    assert records[-1]["epoch"] == pytest.approx(3 / ((slices // 2) // 2))
