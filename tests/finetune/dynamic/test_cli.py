"""``medtune finetune --task dynamic`` end to end on generated BraTS data: a tiny Med-DANet V2
through its three phases, validated, predicting label maps with a FLOPs report per case,
and the bad inputs of the issue (another slice size, an all-zero volume, a crop larger
than the slice)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medtune.cli import main


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    config = {
        "data": {"mode": "2d", "img_size": 32, "val_fraction": 0.34, "num_workers": 0},
        "model": {"widths": [4], "crop_size": 16, "phases": [1, 1, 1]},
        "train": {"max_steps": 6, "batch_size": 8, "eval_every": 6, "log_every": 1, "mixed_precision": "no"},
    }
    path = tmp_path_factory.mktemp("dynamic") / "tiny_meddanet_v2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run(recipe, synth_brats) -> Path:
    folder = recipe.parent / "run"
    assert main(["finetune", "--task", "dynamic", "--config", str(recipe), "--data", str(synth_brats),
                 "--output", str(folder)]) == 0
    return folder


def test_a_dynamic_run_goes_through_its_three_phases_and_is_validated(run):
    from medtune.checkpoints.io import load_json

    config = load_json(run / "config.json")
    assert config["task"] == "dynamic" and config["model"]["form"] == "v2"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    phases = [line["phase"] for line in lines if "phase" in line]
    assert phases == [1, 1, 2, 2, 3, 3]
    assert all("chose_skip" in line for line in lines if line.get("phase") == 3)
    final = load_json(run / "summary.json")["final"]
    assert 0 <= final["Dice_mean"] <= 1 and 0 <= final["relative_flops"] <= 1.0
    shares = sum(final[f"chose_{path}"] for path in ("skip", "crop", "whole", "empty"))
    assert shares == pytest.approx(1.0)


def test_predict_writes_label_maps_and_a_flops_report_per_case(run, synth_brats, tmp_path):
    out = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(synth_brats), "--output", str(out)]) == 0
    for case in sorted(p for p in synth_brats.iterdir() if p.is_dir()):
        written = nib.load(str(out / f"{case.name}.nii.gz"))
        reference = nib.load(str(case / f"{case.name}_seg.nii.gz"))
        assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
        report = json.loads((out / f"{case.name}.dynamic.json").read_text())
        assert len(report["slices"]) == reference.shape[2]
        assert {row["choice"] for row in report["slices"]} <= {"skip", "crop", "whole", "empty", "outside"}
        assert report["dynamic"]["flops_counted"] == sum(row["flops"] for row in report["slices"])
        for row in report["slices"]:
            if row["choice"] in ("skip", "empty", "outside"):
                assert row["path_flops"] == 0
            if row["choice"] in ("crop", "whole"):
                assert row["path_flops"] > 0 and len(row["bits"]) == 4 and set(row["bits"]) <= {8, 16}
                assert row["cost_model_flops"] <= row["flops"]
        assert report["static"]["flops_counted"] > 0 and report["ratios"]["flops_counted"] > 0
        assert "cost model" in report["note"] and report["static"]["wall_s"] > 0
    summary = json.loads((out / "dynamic_summary.json").read_text())
    assert summary["cases"] == 3 and summary["static_gflops_per_volume"] > 0
    # the label maps are scored like any segmentation prediction
    assert main(["evaluate", "--pred", str(out), "--gt", str(synth_brats)]) == 0


@pytest.mark.parametrize("slice_fit", ["pad", "resize"])
def test_slices_larger_than_the_training_slices_are_fitted_not_cropped(run, tmp_path, slice_fit):
    from medtune.data.synth import synthesize_brats

    data = tmp_path / "big"
    synthesize_brats(data, cases=1, shape=(56, 44, 8), seed=3)
    out = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(data), "--output", str(out),
                 "--slice-fit", slice_fit]) == 0
    case = next(p for p in data.iterdir() if p.is_dir())
    assert nib.load(str(out / f"{case.name}.nii.gz")).shape == (56, 44, 8)
    report = json.loads((out / f"{case.name}.dynamic.json").read_text())
    assert report["slice_fit"] == slice_fit and min(report["slice_size"]) > 32
    expected = [-(-s // 8) * 8 for s in report["slice_size"]] if slice_fit == "pad" else [32, 32]
    assert report["fitted_size"] == expected


def test_an_all_zero_volume_gets_an_empty_label_map(run, synth_brats, tmp_path):
    source = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    case = tmp_path / "zeros" / "BraTS20_Training_099"
    case.mkdir(parents=True)
    for image in source.glob("*.nii.gz"):
        if not image.name.endswith("_seg.nii.gz"):
            img = nib.load(str(image))
            name = image.name.replace(source.name, case.name)
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(case / name))
    out = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(case), "--output", str(out)]) == 0
    labels = np.asarray(nib.load(str(out / f"{case.name}.nii.gz")).dataobj)
    assert labels.shape == (32, 32, 16) and not labels.any()
    report = json.loads((out / f"{case.name}.dynamic.json").read_text())
    assert {row["choice"] for row in report["slices"]} <= {"empty", "outside"}
    assert report["dynamic"]["flops_counted"] == 0


def test_a_crop_larger_than_the_slice_is_refused_before_any_data_is_read(recipe, synth_brats, tmp_path, capsys):
    code = main(["finetune", "--task", "dynamic", "--config", str(recipe), "--data", str(synth_brats),
                 "--output", str(tmp_path / "r"), "--set", "model.crop_size=48"])
    err = capsys.readouterr().err
    assert code == 2 and "model.crop_size 48 is larger than the slice (data.img_size 32)" in err
    assert not (tmp_path / "r").exists()


def test_params_lists_the_dynamic_model_per_volume_next_to_the_static_one(run, synth_brats, capsys):
    assert main(["params", "--dynamic", str(run), "--data", str(synth_brats), "--format", "json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    dynamic, static = rows["dynamic (Med-DANet v2)"], rows["static (whole-slice path)"]
    assert dynamic["volumes"] == static["volumes"] == 3
    assert dynamic["parameters"] > static["parameters"] > 0
    assert dynamic["gflops_per_volume"] > 0 and static["gflops_per_volume"] > 0


def test_a_backbone_segmenter_run_trains_predicts_and_reloads(recipe, synth_brats, tmp_path):
    """``model.segmenter: backbone`` through the CLI: a tiny ViT + U-Net decoder dynamic run, its
    weights reloaded by ``predict`` (one bit width per slice: the backbone is one unit)."""
    folder = tmp_path / "vit_run"
    backbone = {"name": "vit_tiny_patch16_224", "options": {"depth": 4, "dynamic_img_size": True}}
    overrides = ["model.segmenter=backbone", f"model.backbones=[{json.dumps(backbone)}]", "model.decoder=unet",
                 "model.decoder_options={channels: [8, 8, 8, 8]}", "model.widths=[16]", "train.max_steps=3",
                 "train.eval_every=3"]
    assert main(["finetune", "--task", "dynamic", "--config", str(recipe), "--data", str(synth_brats),
                 "--output", str(folder), "--set", *overrides]) == 0
    out = tmp_path / "preds"
    assert main(["predict", "--model", str(folder), "--input", str(synth_brats), "--output", str(out)]) == 0
    case = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    report = json.loads((out / f"{case.name}.dynamic.json").read_text())
    assert {row["choice"] for row in report["slices"]} <= {"skip", "crop", "whole", "empty", "outside"}
    ran = [row for row in report["slices"] if row["choice"] in ("crop", "whole")]
    assert all(len(row["bits"]) == 1 and row["path_flops"] > 0 for row in ran)
    assert report["static"]["flops_counted"] > 0  # the reloaded backbone + decoder ran every slice
    from medtune.finetune.weights import load_trained

    model = load_trained(folder).model
    assert model.config.segmenter == "backbone" and len(model.selectors) == 1
