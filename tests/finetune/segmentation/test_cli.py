"""End to end on generated BraTS data: finetune -> predict -> evaluate -> export -> reload.

Tiny everything (the ``tiny_segmentation_recipe`` fixture): vit_tiny with 4 blocks on 32x32
slices, crops of 4 slices, 3 steps.
The CLI runs in-process (``medtune.cli.main``) to skip interpreter start-up.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from medtune.cli import main


@pytest.fixture(scope="module")
def write_config(tiny_segmentation_recipe):
    """``write_config(folder, **sections)``: ``folder/config.yaml``, the tiny recipe with
    the given sections replaced."""

    def write(folder: Path, **changes) -> Path:
        config = copy.deepcopy(tiny_segmentation_recipe)
        for key, value in changes.items():
            config[key] = value
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def error_line(stderr: str) -> str:
    """The one ``medtune: error:`` line of a failed command (progress bars aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("medtune: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def medtuning_run(synth_brats, write_config, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("medtuning")
    config = write_config(folder)
    assert run_cli("finetune", "--config", config, "--data", synth_brats, "--output", folder / "run") == 0
    return folder / "run"


@pytest.fixture(scope="module")
def lora_run(synth_brats, write_config, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    config = write_config(folder, adapter={"method": "lora", "r": 2})
    code = run_cli(
        "finetune", "--config", config, "--data", synth_brats, "--output", folder / "run", "--self-distill",
        "--set", "train.max_steps=2", "--set", "data.val_fraction=0",
    )
    assert code == 0
    return folder / "run"


def test_finetune_writes_a_complete_run_folder(medtuning_run):
    from medtune.checkpoints.io import load_json

    for name in ("config.json", "backbone.safetensors", "model.safetensors", "adapter.json",
                 "adapter.safetensors", "head.safetensors", "summary.json", "best/model.safetensors",
                 "best/adapter.safetensors", "best/head.safetensors", "best/summary.json", "metrics.jsonl"):
        assert (medtuning_run / name).is_file(), name
    config = load_json(medtuning_run / "config.json")
    assert config["task"] == "segmentation" and config["derived"]["label_values"] == [0, 1, 2, 4]
    assert config["adapter"]["method"] == "med-tuning"
    evals = [line for line in (medtuning_run / "metrics.jsonl").read_text().splitlines() if "eval/Dice_mean" in line]
    assert len(evals) == 2  # steps 2 and 3
    summary = load_json(medtuning_run / "summary.json")
    assert summary["steps"] == 3 and summary["best_step"] in (2, 3) and "Dice_mean" in summary["final"]
    assert load_json(medtuning_run / "best" / "summary.json")["step"] == summary["best_step"]
    with safe_open(str(medtuning_run / "adapter.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert any(".med_adapter." in k for k in keys) and "model.pos_embed" in keys  # backbone names
    assert not any(k.endswith("attn.qkv.weight") for k in keys)  # frozen tensors stay out
    with safe_open(str(medtuning_run / "head.safetensors"), "pt") as handle:
        assert all(k.startswith("decoder.") for k in handle.keys())
    with safe_open(str(medtuning_run / "model.safetensors"), "pt") as handle:
        assert "backbone.model.blocks.0.attn.qkv.weight" in set(handle.keys())


def test_resume_continues_from_the_last_state(medtuning_run, synth_brats, write_config, tmp_path):
    from medtune.checkpoints.io import load_json
    from medtune.finetune.weights import file_sha256

    run_dir = tmp_path / "run"
    shutil.copytree(medtuning_run, run_dir)
    base_sha = file_sha256(run_dir / "backbone.safetensors")
    config = write_config(tmp_path)
    code = run_cli(
        "finetune", "--config", config, "--data", synth_brats, "--output", run_dir,
        "--resume", "latest", "--set", "train.max_steps=4", "--set", "train.eval_every=0",
    )
    assert code == 0
    assert (run_dir / "state" / "step_0000004").is_dir()
    assert load_json(run_dir / "state" / "step_0000004" / "trainer_state.json")["step"] == 4
    # the base the run started from is kept, so adapter files still apply to it
    assert file_sha256(run_dir / "backbone.safetensors") == base_sha
    assert load_json(run_dir / "adapter.json")["base_weights"]["sha256"] == base_sha


def test_predict_then_evaluate(medtuning_run, synth_brats, tmp_path, capsys):
    out = tmp_path / "pred"
    assert run_cli("predict", "--model", medtuning_run, "--input", synth_brats, "--output", out, "--tta") == 0
    case = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    source = nib.load(str(case / f"{case.name}_flair.nii.gz"))
    pred = nib.load(str(out / f"{case.name}.nii.gz"))
    assert pred.shape == source.shape
    assert np.array_equal(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    # one case folder as input gives the same label map
    single = tmp_path / "single"
    assert run_cli("predict", "--model", medtuning_run, "--input", case, "--output", single, "--tta") == 0
    assert np.array_equal(np.asarray(nib.load(str(single / f"{case.name}.nii.gz")).dataobj), np.asarray(pred.dataobj))

    capsys.readouterr()
    assert run_cli("evaluate", "--pred", out, "--gt", synth_brats) == 0
    printed = capsys.readouterr().out
    assert "mean Dice: WT" in printed and "mean HD95 (mm)" in printed
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("case,Dice_WT,Dice_TC,Dice_ET,HD95_WT") and len(lines) == 4


def _logits(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    volume = torch.randn(1, 4, 32, 32, 4, generator=generator)
    with torch.no_grad():
        return model.forward_logits(volume)


def test_exports_reload_to_identical_predictions(medtuning_run, tmp_path):
    from medtune.finetune import load_segmenter

    reference = _logits(load_segmenter(medtuning_run))
    for fmt in ("adapter", "full"):
        assert run_cli("export", medtuning_run, "--format", fmt, "--out", tmp_path / fmt) == 0
        assert torch.equal(_logits(load_segmenter(tmp_path / fmt)), reference), fmt
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    adapter_bytes = sum((tmp_path / "adapter" / f).stat().st_size for f in ("adapter.safetensors", "head.safetensors"))
    assert adapter_bytes < (tmp_path / "full" / "model.safetensors").stat().st_size / 2


def test_lora_merged_export_matches_and_other_methods_refuse(lora_run, medtuning_run, tmp_path, capsys):
    from medtune.finetune import load_segmenter

    model = load_segmenter(lora_run)
    assert model.self_distill is not None  # --self-distill was wired in
    reference = _logits(model)
    assert run_cli("export", lora_run, "--format", "merged", "--out", tmp_path / "merged") == 0
    merged = load_segmenter(tmp_path / "merged")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged), reference, atol=1e-5)
    assert run_cli("export", lora_run, "--format", "adapter", "--out", tmp_path / "adapter") == 0
    assert torch.equal(_logits(load_segmenter(tmp_path / "adapter")), reference)

    capsys.readouterr()
    assert run_cli("export", medtuning_run, "--format", "merged", "--out", tmp_path / "nope") == 2
    err = error_line(capsys.readouterr().err)
    assert "med-tuning" in err and "merged" in err
    assert not (tmp_path / "nope").exists()  # a refused export leaves no empty folder behind


def _file_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_set_takes_several_overrides_like_pretrain():
    from medtune.cli import build_parser

    args = build_parser("finetune").parse_args(
        ["finetune", "--set", "train.max_steps=1", "train.seed=3", "--set", "data.val_fraction=0"]
    )
    assert args.set == ["train.max_steps=1", "train.seed=3", "data.val_fraction=0"]


def test_finetune_and_export_refuse_to_overwrite_a_run(medtuning_run, synth_brats, write_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(medtuning_run, run_dir)
    before = _file_hashes(run_dir)
    config = write_config(tmp_path)
    capsys.readouterr()
    code = run_cli("finetune", "--config", config, "--data", synth_brats, "--output", run_dir,
                   "--set", "train.max_steps=1", "data.val_fraction=0")
    err = error_line(capsys.readouterr().err)
    assert code == 2 and str(run_dir) in err and "--resume" in err
    for fmt in ("full", "adapter"):
        assert run_cli("export", run_dir, "--format", fmt, "--out", run_dir) == 2
        assert "run folder itself" in error_line(capsys.readouterr().err)
    assert _file_hashes(run_dir) == before


# --------------------------------------------------------------------------- bad inputs


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_label(path: Path, change) -> None:
    img = nib.load(str(path))
    data = change(np.asarray(img.dataobj).copy())
    nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine), str(path))


def test_label_values_outside_the_declared_set_exit_2(synth_brats, write_config, tmp_path, capsys):
    data = _copy_dataset(synth_brats, tmp_path / "data")
    case = sorted(p for p in data.iterdir() if p.is_dir())[1]
    label = case / f"{case.name}_seg.nii.gz"

    def add_three(array):
        array[0, 0, 0] = 3
        return array

    _rewrite_label(label, add_three)
    config = write_config(tmp_path)
    code = run_cli("finetune", "--config", config, "--data", data, "--output", tmp_path / "run", "--set", "data.val_fraction=0")
    err = error_line(capsys.readouterr().err)
    assert code == 2 and f"{case.name}_seg.nii.gz" in err and "[3]" in err


def test_image_label_shape_mismatch_exit_2(synth_brats, write_config, tmp_path, capsys):
    data = _copy_dataset(synth_brats, tmp_path / "data")
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    _rewrite_label(case / f"{case.name}_seg.nii.gz", lambda array: array[:, :, :-2])
    config = write_config(tmp_path)
    code = run_cli("finetune", "--config", config, "--data", data, "--output", tmp_path / "run")
    err = error_line(capsys.readouterr().err)
    assert code == 2 and f"{case.name}_seg.nii.gz" in err and "shape" in err


def test_modality_count_other_than_in_chans_exit_2_before_writing(synth_brats, write_config, tmp_path, capsys):
    config = write_config(tmp_path)
    code = run_cli("finetune", "--config", config, "--data", synth_brats, "--output", tmp_path / "run",
                   "--set", "data.modalities=[flair,t1ce,t1]")
    err = error_line(capsys.readouterr().err)
    assert code == 2 and "3 modalities" in err and "backbone.in_chans is 4" in err
    assert not (tmp_path / "run").exists()


def test_adapter_on_another_backbone_and_run_without_weights_exit_2(medtuning_run, synth_brats, tiny_vit_config,
                                                                   tmp_path, capsys):
    from medtune.checkpoints.io import save_safetensors
    from medtune.models.backbones import create_backbone

    assert run_cli("export", medtuning_run, "--format", "adapter", "--out", tmp_path / "adapter") == 0
    other = create_backbone(dataclasses.replace(tiny_vit_config, in_chans=3))  # the run's ViT on 3 channels
    save_safetensors(other.state_dict(), tmp_path / "other.safetensors")
    capsys.readouterr()
    code = run_cli(
        "predict", "--model", tmp_path / "adapter", "--input", synth_brats, "--output", tmp_path / "p",
        "--base-weights", tmp_path / "other.safetensors",
    )
    err = error_line(capsys.readouterr().err)
    assert code == 2 and "model.patch_embed.proj.weight" in err

    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(medtuning_run / "config.json", empty / "config.json")
    code = run_cli("predict", "--model", empty, "--input", synth_brats, "--output", tmp_path / "p2")
    err = error_line(capsys.readouterr().err)
    assert code == 2 and str(empty) in err and "model.safetensors" in err


def test_evaluate_scores_ground_truth_as_perfect_and_refuses_bad_predictions(synth_brats, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    cases = sorted(p for p in synth_brats.iterdir() if p.is_dir())
    for case in cases:
        shutil.copy(case / f"{case.name}_seg.nii.gz", pred / f"{case.name}.nii.gz")
    assert run_cli("evaluate", "--pred", pred, "--gt", synth_brats, "--csv", tmp_path / "s.csv") == 0
    assert "mean Dice: WT 1.0000  TC 1.0000  ET 1.0000" in capsys.readouterr().out
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert all(",1.000000,1.000000,1.000000,0.000000,0.000000,0.000000" in row for row in rows)

    bad = pred / f"{cases[0].name}.nii.gz"
    _rewrite_label(bad, lambda array: np.where(array == 4, 3, array))
    assert run_cli("evaluate", "--pred", pred, "--gt", synth_brats) == 2
    err = error_line(capsys.readouterr().err)
    assert str(bad) in err and "[3]" in err
    bad.unlink()
    assert run_cli("evaluate", "--pred", pred, "--gt", synth_brats) == 2
    assert f"{cases[0].name}.nii.gz" in error_line(capsys.readouterr().err)


def test_predict_needs_an_output_folder_and_a_folder_input(medtuning_run, synth_brats, tmp_path, capsys):
    assert run_cli("predict", "--model", medtuning_run, "--input", synth_brats) == 2
    assert "--output" in error_line(capsys.readouterr().err)
    case = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    image = case / f"{case.name}_flair.nii.gz"
    assert run_cli("predict", "--model", medtuning_run, "--input", image, "--output", tmp_path / "p") == 2
    assert "is a file" in error_line(capsys.readouterr().err)


def test_run_records_its_channel_order_and_predicts_an_msd_folder_the_same(medtuning_run, synth_brats, tmp_path):
    import json

    recorded = json.loads((medtuning_run / "config.json").read_text())["data"]["modalities"]
    assert recorded == ["flair", "t1ce", "t1", "t2"]
    # the same cases as an MSD folder whose 4D images hold the channels in another order
    case = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    order = ["T1w", "t1gd", "T2w", "FLAIR"]
    files = {"T1w": "t1", "t1gd": "t1ce", "T2w": "t2", "FLAIR": "flair"}
    source = nib.load(str(case / f"{case.name}_flair.nii.gz"))
    stack = np.stack([np.asarray(nib.load(str(case / f"{case.name}_{files[n]}.nii.gz")).dataobj) for n in order], -1)
    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(stack, source.affine), str(msd / "imagesTr" / f"{case.name}.nii.gz"))
    shutil.copy(case / f"{case.name}_seg.nii.gz", msd / "labelsTr" / f"{case.name}.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "modality": {str(i): n for i, n in enumerate(order)},
        "labels": {"0": "background", "1": "core", "2": "edema", "4": "enhancing"},
        "training": [{"image": f"./imagesTr/{case.name}.nii.gz", "label": f"./labelsTr/{case.name}.nii.gz"}],
    }))
    brats_pred, msd_pred = tmp_path / "brats_pred", tmp_path / "msd_pred"
    assert run_cli("predict", "--model", medtuning_run, "--input", case, "--output", brats_pred) == 0
    assert run_cli("predict", "--model", medtuning_run, "--input", msd, "--output", msd_pred) == 0
    expected = np.asarray(nib.load(str(brats_pred / f"{case.name}.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(nib.load(str(msd_pred / f"{case.name}.nii.gz")).dataobj), expected)
    # the unlabeled test images of an MSD task: imagesTs/ of 4D files
    (msd / "imagesTs").mkdir()
    shutil.copy(msd / "imagesTr" / f"{case.name}.nii.gz", msd / "imagesTs" / f"{case.name}.nii.gz")
    test_pred = tmp_path / "msd_test_pred"
    assert run_cli("predict", "--model", medtuning_run, "--input", msd / "imagesTs", "--output", test_pred) == 0
    assert np.array_equal(np.asarray(nib.load(str(test_pred / f"{case.name}.nii.gz")).dataobj), expected)


def test_predict_reads_an_nnunet_images_folder_in_the_run_channel_order(medtuning_run, synth_brats, tmp_path):
    import json

    case = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    order = ["T2w", "FLAIR", "T1w", "t1gd"]
    files = {"T1w": "t1", "t1gd": "t1ce", "T2w": "t2", "FLAIR": "flair"}
    dataset = tmp_path / "Dataset001"
    (dataset / "imagesTs").mkdir(parents=True)
    for channel, name in enumerate(order):
        shutil.copy(case / f"{case.name}_{files[name]}.nii.gz", dataset / "imagesTs" / f"{case.name}_{channel:04d}.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(order)},
        "labels": {"background": 0, "core": 1, "edema": 2, "enhancing": 4}, "file_ending": ".nii.gz",
    }))
    brats_pred, nnunet_pred = tmp_path / "brats_pred", tmp_path / "nnunet_pred"
    assert run_cli("predict", "--model", medtuning_run, "--input", case, "--output", brats_pred) == 0
    assert run_cli("predict", "--model", medtuning_run, "--input", dataset / "imagesTs", "--output", nnunet_pred) == 0
    expected = np.asarray(nib.load(str(brats_pred / f"{case.name}.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(nib.load(str(nnunet_pred / f"{case.name}.nii.gz")).dataobj), expected)
