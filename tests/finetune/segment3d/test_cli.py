"""``medtune finetune --task segment3d`` end to end on generated BraTS data: a tiny TransBTSV2
trained 2 steps on 16^3 crops, validated and predicting with sliding windows, exported and
read back to the same outputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medtune.cli import main


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A segment3d recipe without its ``task:`` key (``--task`` picks it): tiny TransBTSV2
    (widths 2-16, 8-wide tokens, DBMs), odd 15 x 16 x 12 crops (padded to 16^3 inside), 2 steps."""
    options = {"base_channels": 2, "encoder_blocks": [1, 1, 1, 1], "embed_dim": 8, "num_heads": 2, "mlp_ratio": 2.0,
               "dropout": 0.0, "attn_dropout": 0.0, "dbm_reduction": 2}
    config = {
        "data": {"mode": "3d", "crop_size": [15, 16, 12], "val_fraction": 0.34, "num_workers": 0},
        "model": {"network": "transbtsv2", "in_chans": 4, "options": options},
        "loss": {"dice_ce": 1.0, "pne": {"weight": 0.1, "embed_dim": 4, "anchors_per_class": 4, "pairs": 4}},
        "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "log_every": 1, "mixed_precision": "no"},
        "validation": {"overlap": 0.0},
    }
    path = tmp_path_factory.mktemp("segment3d") / "tiny_transbtsv2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run(recipe, synth_brats) -> Path:
    folder = recipe.parent / "run"
    assert main(["finetune", "--task", "segment3d", "--config", str(recipe), "--data", str(synth_brats),
                 "--output", str(folder)]) == 0
    return folder


def test_segment3d_trains_validates_and_predicts_label_maps(run, synth_brats, tmp_path):
    from medtune.checkpoints.io import load_json

    config = load_json(run / "config.json")
    assert config["task"] == "segment3d" and config["model"]["network"] == "transbtsv2"
    assert (run / "best" / "model.safetensors").is_file()
    summary = load_json(run / "summary.json")
    assert 0.0 <= summary["final"]["Dice_mean"] <= 1.0
    logged = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"pne"' in line]
    assert len(logged) == 2  # each loss term is logged
    case = sorted(p for p in synth_brats.iterdir() if p.is_dir())[0]
    assert main(["predict", "--model", str(run), "--input", str(case), "--output", str(tmp_path / "preds")]) == 0
    written = nib.load(str(tmp_path / "preds" / f"{case.name}.nii.gz"))
    reference = nib.load(str(case / f"{case.name}_seg.nii.gz"))
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}


def test_an_exported_segment3d_run_reads_back_to_the_same_outputs(run, tmp_path):
    from medtune.finetune import load_segmenter
    from medtune.finetune.weights import load_trained

    assert main(["export", str(run), "--format", "full", "--out", str(tmp_path / "exported")]) == 0
    trained, exported = load_trained(run).model, load_segmenter(tmp_path / "exported")
    assert type(exported).__name__ == "NetworkSegmenter" and exported.roi_size == (15, 16, 12)
    x = torch.randn(1, 4, 15, 16, 12)
    with torch.no_grad():
        assert torch.equal(trained.forward_logits(x), exported.forward_logits(x))
    assert set(exported.criterion.terms) == {"dice_ce", "pne"}  # the projection head is part of the weights


def test_a_loss_the_network_cannot_feed_is_refused_before_any_data_is_read(recipe, synth_brats, tmp_path, capsys):
    code = main(["finetune", "--task", "segment3d", "--config", str(recipe), "--data", str(synth_brats),
                 "--output", str(tmp_path / "r"), "--set", "loss.cga_sam=1.0"])
    err = capsys.readouterr().err
    assert code == 2 and "loss 'cga_sam' needs the model output(s) sam_logits" in err
    assert not (tmp_path / "r").exists()
