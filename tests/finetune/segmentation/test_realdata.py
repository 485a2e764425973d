"""A dataset that is not BraTS-shaped, end to end: a generated MSD-layout CT task (3D HU
images with an air background, anisotropic voxels, LPS/RAS/PSR files) through pretrain,
finetune (two folds, two methods), predict (probabilities, the test list, an ensemble)
and evaluate (the task's labels and nnU-Net's rules). Tiny everything, in-process."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medtune.cli import main

from tests import REPO


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct") / "Task99_SynthCT"
    assert run_cli("data", "synth", "--kind", "ct", "--out", root, "--cases", "4", "--shape", "32", "32", "8",
                   "--test-cases", "1") == 0
    return root


@pytest.fixture(scope="module")
def runs(ct, tiny_segmentation_recipe, tiny_pretrain_overrides, tmp_path_factory) -> dict[str, Path]:
    """A FreMAE pretraining run on the CT task, a Med-Tuning run on fold 0 from it, and a
    full-finetuning run on fold 1 (switched from the Med-Tuning recipe on the command line)."""
    folder = tmp_path_factory.mktemp("ct_runs")
    recipe = copy.deepcopy(tiny_segmentation_recipe)
    recipe["backbone"]["in_chans"] = 1
    recipe["adapter"] = {"method": "med-tuning", "ratio": 6}
    recipe["train"].update(max_steps=2, save_every=0)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("pretrain", "--config", REPO / "configs" / "demo_pretrain.yaml", "--data", ct, "--layout", "msd",
                   "--modalities", "CT", "--output", folder / "pre", "--set", *tiny_pretrain_overrides,
                   "backbone.in_chans=1", "train.max_steps=2", "train.save_every=0", "figure=false") == 0
    assert run_cli("finetune", "--config", folder / "recipe.yaml", "--data", ct, "--backbone", folder / "pre",
                   "--folds", "2", "--fold", "0", "--output", folder / "medtuning") == 0
    assert run_cli("finetune", "--config", folder / "recipe.yaml", "--data", ct, "--layout", "msd",
                   "--folds", "2", "--fold", "1", "--set", "adapter.method=full", "--output", folder / "full") == 0
    return {"pre": folder / "pre", "medtuning": folder / "medtuning", "full": folder / "full"}


def test_runs_record_the_plan_the_folds_and_the_validation_cases(runs, ct):
    pre = json.loads((runs["pre"] / "config.json").read_text())
    assert pre["derived"]["data_plan"]["normalization"][0]["scheme"] == "ct"
    config = json.loads((runs["medtuning"] / "config.json").read_text())
    derived = config["derived"]
    assert config["data"]["modalities"] == ["CT"] and derived["layout"] == "msd"
    assert derived["regions"] == {"organ": [1], "lesion": [2]} and derived["label_values"] == [0, 1, 2]
    plan = derived["data_plan"]
    assert plan["axcodes"] == "RAS" and len(plan["spacing"]) == 3 and plan["spacing"][2] > 2 * plan["spacing"][0]
    splits = json.loads((runs["medtuning"] / "splits_final.json").read_text())
    assert len(splits) == 2 and derived["validation_cases"] == splits[0]["val"]
    other = json.loads((runs["full"] / "config.json").read_text())
    assert other["derived"]["validation_cases"] == splits[1]["val"]
    assert other["adapter"] == {"method": "full"}  # the recipe's ratio was dropped, not refused
    # the grid is the dataset's, the CT statistics each fold's own
    assert other["derived"]["data_plan"]["spacing"] == plan["spacing"]
    assert other["derived"]["data_plan"]["normalization"] != plan["normalization"]


def test_logs_name_the_whole_model_and_a_random_frozen_backbone(ct, runs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    code = run_cli("finetune", "--config", runs["medtuning"].parent / "recipe.yaml", "--data", ct,
                   "--output", tmp_path / "r", "--set", "train.max_steps=1", "data.val_fraction=0")
    assert code == 0
    text = caplog.text
    assert "randomly initialised frozen backbone" in text
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("segmenter (med-tuning)"))
    assert "decoder" in line and "adapter" in line and "backbone" in line


def test_predict_maps_back_to_every_input_grid_and_writes_probabilities(runs, ct, tmp_path):
    out = tmp_path / "pred"
    assert run_cli("predict", "--model", runs["medtuning"], "--input", ct, "--output", out,
                   "--save-probabilities") == 0
    orientations = set()
    for image in sorted((ct / "imagesTr").glob("*.nii.gz")):
        source = nib.load(str(image))
        pred = nib.load(str(out / image.name))
        assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
        probs = np.load(out / image.name.replace(".nii.gz", ".npz"))
        assert probs["probabilities"].dtype == np.float16 and probs["probabilities"].shape == (3, *source.shape)
        assert probs["label_values"].tolist() == [0, 1, 2]
        np.testing.assert_allclose(probs["probabilities"].astype(np.float32).sum(0), 1.0, atol=1e-2)
        orientations.add("".join(nib.aff2axcodes(source.affine)))
    assert orientations == {"LPS", "RAS", "PSR"}
    # the test list of dataset.json, and --layout/modalities taken from the run
    test = tmp_path / "test"
    assert run_cli("predict", "--model", runs["medtuning"], "--input", ct, "--subset", "test", "--output", test) == 0
    assert [p.name for p in test.iterdir()] == ["ct_101.nii.gz"]


def test_an_ensemble_averages_the_runs_probabilities(runs, ct, tmp_path):
    images = tmp_path / "imagesTs"
    images.mkdir()
    (images / "ct_002.nii.gz").symlink_to(ct / "imagesTr" / "ct_002.nii.gz")
    preds = {}
    for name, models in (("a", [runs["medtuning"]]), ("b", [runs["full"]]), ("ab", [runs["medtuning"], runs["full"]])):
        assert run_cli("predict", "--model", *models, "--input", images, "--output", tmp_path / name,
                       "--save-probabilities") == 0
        preds[name] = np.load(tmp_path / name / "ct_002.npz")["probabilities"].astype(np.float32)
    np.testing.assert_allclose(preds["ab"], (preds["a"] + preds["b"]) / 2, atol=2e-3)
    labels = np.asarray(nib.load(str(tmp_path / "ab" / "ct_002.nii.gz")).dataobj)
    assert (labels == np.asarray([0, 1, 2])[preds["ab"].argmax(0)]).mean() > 0.99


def test_evaluate_uses_the_tasks_labels_and_nnunets_rules(runs, ct, tmp_path, capsys):
    out = tmp_path / "pred"
    assert run_cli("predict", "--model", runs["medtuning"], "--input", ct, "--output", out) == 0
    capsys.readouterr()
    assert run_cli("evaluate", "--pred", out, "--gt", ct) == 0
    printed = capsys.readouterr().out
    assert "(nnunet rules)" in printed and "mean Dice: organ" in printed and "lesion" in printed
    assert "WT" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rules"] == "nnunet" and set(summary["mean"]) == {"organ", "lesion"}
    assert len(summary["metric_per_case"]) == 4 and set(summary["foreground_mean"]) == {"Dice", "HD95"}
    # ground truth as prediction: perfect where defined; ct_004 has no lesion: NaN, left out and counted
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for label in (ct / "labelsTr").glob("*.nii.gz"):
        (perfect / label.name).write_bytes(label.read_bytes())
    assert run_cli("evaluate", "--pred", perfect, "--gt", ct, "--labels", "0,1,2") == 0
    printed = capsys.readouterr().out
    assert "mean Dice: organ 1.0000  lesion 1.0000  mean 1.0000" in printed
    assert "Dice of lesion: undefined in 1 of 4 cases" in printed
    summary = json.loads((perfect / "summary.json").read_text())
    lesion_free = next(c for c in summary["metric_per_case"] if c["case"] == "ct_004")
    assert lesion_free["metrics"]["lesion"] == {"Dice": None, "HD95": None}
    assert summary["nan_counts"]["lesion"]["Dice"] == 1
