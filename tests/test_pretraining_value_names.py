"""benchmarks/pretraining_value.py reuses finished runs by folder name: a run made under other
settings (pretraining or finetuning steps, (b)'s rate, layer decay or frozen steps) must never be found
under the name of the default one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_value.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pretraining_value", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def budget(bench, **changes) -> dict:
    values = dict(bench.FULL, default_pretrain_steps=bench.FULL["pretrain_steps"],
                  default_finetune_steps=bench.FULL["finetune_steps"], arm_steps={},
                  default_unlabeled=bench.FULL["unlabeled"], full_lr=bench.FULL_LR, full_layer_decay=None,
                  full_frozen_steps=0, depth=bench.DEMO_DEPTH, img_size=bench.IMG_SIZE)
    values.update(changes)
    return values


def test_default_runs_keep_their_names(bench):
    default = budget(bench)
    assert [bench.arm_label(arm, default) for arm in bench.ARMS] == list(bench.ARMS)
    assert bench.run_tag("full", default) == "full"
    assert bench.run_tag("med-tuning", default) == "med-tuning"


def test_per_arm_steps_name_only_that_arm(bench):
    equal_time = budget(bench, arm_steps={"mae": 1000, "simmim": 1000})
    labels = {arm: bench.arm_label(arm, equal_time) for arm in bench.ARMS}
    assert labels == {"none": "none", "fremae": "fremae", "mae": "mae-1000", "simmim": "simmim-1000", "mfm": "mfm"}
    assert bench.pretrain_steps("mae", equal_time) == 1000
    assert bench.pretrain_steps("fremae", equal_time) == bench.FULL["pretrain_steps"]


def test_other_steps_rates_and_decays_get_their_own_folders(bench):
    longer = budget(bench, pretrain_steps=400)
    assert bench.arm_label("fremae", longer) == "fremae-400"
    assert bench.arm_label("none", longer) == "none"  # nothing pretrained: nothing to tell apart
    faster = budget(bench, pretrain_lr=2e-3)
    assert [bench.arm_label(arm, faster) for arm in ("none", "fremae", "mae")] == ["none", "fremae-lr0.002", "mae-lr0.002"]
    assert bench.pretrain_recipe("mae", faster, 0)["train"]["optim"]["lr"] == 2e-3
    assert bench.pretrain_recipe("mae", budget(bench), 0)["train"]["optim"]["lr"] == 5e-4  # the demo recipe's
    tags = {
        bench.run_tag(mode, budget(bench, **changes))
        for mode in ("full", "med-tuning")
        for changes in ({}, {"finetune_steps": 400}, {"full_lr": 5e-4}, {"full_layer_decay": 0.9},
                        {"full_frozen_steps": 50}, {"full_layer_decay": 0.9, "full_frozen_steps": 50},
                        {"full_anchor_decay": 10.0}, {"full_layer_decay": 0.9, "full_anchor_decay": 0.5},
                        {"decoder": "upernet"}, {"decoder": "multistage"},
                        {"decoder": "multistage-scratch", "finetune_steps": 50})
    }
    assert tags == {"full", "med-tuning", "full-400steps", "med-tuning-400steps", "full-lr0.0005", "full-ld0.9",
                    "full-frozen50", "full-ld0.9-frozen50", "full-anchor10", "full-ld0.9-anchor0.5",
                    "full-multistage", "med-tuning-multistage",
                    "full-multistage-scratch-50steps", "med-tuning-multistage-scratch-50steps"}


def test_paired_gain_by_hand(bench):
    """Three seeds: differences 0.02, 0.04, -0.03 -> mean 0.01, sd 0.036056, t(0.975, 2) = 4.302653,
    half-width 4.302653 * 0.036056 / sqrt(3) = 0.089567; two seeds ahead."""
    mean, half_width, ahead = bench.paired_gain([0.50, 0.40, 0.60], [0.52, 0.44, 0.57])
    assert mean == pytest.approx(0.01)
    assert half_width == pytest.approx(0.089567, rel=1e-4)
    assert ahead == 2
    mean, half_width, ahead = bench.paired_gain([0.5], [0.6])
    assert mean == pytest.approx(0.1) and half_width != half_width and ahead == 1  # one seed: no interval


def test_the_table_prints_the_paired_interval(bench):
    runs = {"none": [{"WT": 0.5, "mean": 0.50}, {"WT": 0.4, "mean": 0.40}, {"WT": 0.6, "mean": 0.60}],
            "fremae": [{"WT": 0.52, "mean": 0.52}, {"WT": 0.44, "mean": 0.44}, {"WT": 0.57, "mean": 0.57}]}
    lines = bench.table("title", runs).splitlines()
    assert "95% CI (paired)" in lines[1] and "seeds ahead" in lines[1]
    assert lines[3].split()[-5:] == ["+1.0", "-8.0", "..", "+10.0", "2/3"]
    # a long run label keeps every row's columns where the header has them
    long = bench.table("title", {"none": runs["none"], "fremae-1000-mask_ratio_0.5-u64": runs["fremae"]}).splitlines()
    assert len({len(line) for line in long[1:]}) == 1
    assert long[1].index("mean") + len("mean") == long[3].rindex("0.066") + len("0.066")  # the mean's column


def test_the_intensity_reference_reads_each_pixel_alone(bench):
    """The probe's reference features: each pixel's M intensities and their M(M+1)/2 products."""
    import torch

    image = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2, 1, 2)
    (features,) = bench.PixelIntensities().eval().forward_stages(image)
    expected = [[1.0, 2.0], [3.0, -1.0], [1.0, 4.0], [3.0, -2.0], [9.0, 1.0]]  # x0, x1, x0^2, x0 x1, x1^2
    assert features.shape == (1, 5, 1, 2)
    assert features[0, :, 0].tolist() == expected
    line = bench.intensity_reference({"WT": 0.9936, "TC": 0.806, "ET": 0.9608, "mean": 0.92})
    assert "WT 0.994  TC 0.806  ET 0.961  mean 0.920" in line


def test_a_work_folder_holds_data_of_one_anatomy_level(bench, tmp_path):
    (tmp_path / "data" / "unlabeled").mkdir(parents=True)  # made before levels were recorded: level 1
    with pytest.raises(SystemExit, match="holds data of --anatomy 1: pass another --work for --anatomy 2"):
        bench.make_data(tmp_path, budget(bench, anatomy=2))
    assert not (tmp_path / "data" / "anatomy.txt").exists()


def test_another_unlabeled_pool_gets_its_own_data_and_pretraining_runs(bench, tmp_path):
    default = budget(bench)
    larger = budget(bench, unlabeled=64, arm_steps={"fremae": 1000})
    assert bench.unlabeled_dir(tmp_path, default) == tmp_path / "data" / "unlabeled"
    assert bench.unlabeled_dir(tmp_path, larger) == tmp_path / "data" / "unlabeled-64"
    assert [bench.arm_label(arm, default) for arm in bench.ARMS] == list(bench.ARMS)
    labels = {arm: bench.arm_label(arm, larger) for arm in bench.ARMS}
    # runs without pretraining are the same on any pool: shared; every pretrained arm is named for its pool
    assert labels == {"none": "none", "fremae": "fremae-1000-u64", "mae": "mae-u64", "simmim": "simmim-u64",
                      "mfm": "mfm-u64"}
    assert bench.pretrain_dir(tmp_path, "fremae", 3, larger) == tmp_path / "pretrain" / "fremae-1000-u64-seed3"
    assert bench.finetune_name("full", "fremae", 3, larger) == "full-fremae-1000-u64-seed3"


def test_fremae_settings_name_the_fremae_runs_only(bench):
    patch = budget(bench, fremae_settings={"mask_ratio": 0.75, "mask_mode": "patch"})
    labels = {arm: bench.arm_label(arm, patch) for arm in bench.ARMS}
    assert labels == {"none": "none", "fremae": "fremae-mask_mode_patch-mask_ratio_0.75", "mae": "mae",
                      "simmim": "simmim", "mfm": "mfm"}
    shapes = budget(bench, fremae_settings={"jitter_shape": [8, 8]}, arm_steps={"fremae": 1000})
    assert bench.arm_label("fremae", shapes) == "fremae-1000-jitter_shape_8.8"
    assert bench.arm_label("fremae", budget(bench, fremae_settings={})) == "fremae"


def test_finished_runs_keep_their_weights_and_lose_their_resumable_state(bench, tmp_path, monkeypatch):
    def fake_medtune(command, *argv):  # what a finished run leaves: weights, summary, a resumable state
        run = Path(argv[argv.index("--output") + 1])
        (run / "state" / "step-5").mkdir(parents=True)
        (run / "state" / "step-5" / "optimizer.bin").write_bytes(b"moments")
        (run / "backbone.safetensors").write_bytes(b"weights")
        (run / "summary.json").write_text('{"final": {"Dice_WT": 0.5, "Dice_mean": 0.5}}')

    monkeypatch.setattr(bench, "medtune", fake_medtune)
    plan = budget(bench, decoder="upernet")
    run = bench.pretrain(tmp_path, tmp_path / "data" / "unlabeled", "fremae", 0, plan)
    assert (run / "backbone.safetensors").read_bytes() == b"weights" and not (run / "state").exists()
    assert bench.finetune(tmp_path, tmp_path / "data" / "labeled", 0.5, "fremae", "full", 0, plan) == {"WT": 0.5,
                                                                                                      "mean": 0.5}
    finetuned = tmp_path / "finetune" / "full-fremae-seed0"
    assert (finetuned / "summary.json").is_file() and not (finetuned / "state").exists()


def test_another_depth_names_every_arm_and_reaches_every_recipe(bench):
    """--depth changes the backbone of every arm, the one without pretraining too: each run is
    named for it, and the pretraining recipe and the finetuning overrides carry it."""
    import yaml

    demo = yaml.safe_load((SCRIPT.parents[1] / "configs" / "demo_pretrain.yaml").read_text())
    assert bench.DEMO_DEPTH == demo["backbone"]["options"]["depth"]
    deep = budget(bench, depth=12, unlabeled=64, arm_steps={"fremae": 1000})
    assert {arm: bench.arm_label(arm, deep) for arm in bench.ARMS} == {
        "none": "none-d12", "fremae": "fremae-1000-u64-d12", "mae": "mae-u64-d12", "simmim": "simmim-u64-d12",
        "mfm": "mfm-u64-d12"}
    assert bench.arm_label("none", budget(bench, depth=bench.DEMO_DEPTH)) == "none"
    assert bench.pretrain_recipe("fremae", deep, seed=0)["backbone"]["options"]["depth"] == 12
    assert bench.pretrain_recipe("mae", budget(bench), seed=0)["backbone"]["options"]["depth"] == bench.DEMO_DEPTH


def test_gains_are_over_the_baseline_row_at_another_depth(bench):
    """At --depth 12 the arm without pretraining is the row none-d12: the gains are over it
    (a table that looked for a row named none printed no gains at all)."""
    runs = {"none-d12": [{"WT": 0.5, "mean": 0.50}, {"WT": 0.4, "mean": 0.40}],
            "fremae-d12": [{"WT": 0.6, "mean": 0.60}, {"WT": 0.5, "mean": 0.50}]}
    lines = bench.table("title", runs, bench.arm_label("none", budget(bench, depth=12))).splitlines()
    assert lines[2].split() == ["none-d12", "0.450", "+-", "0.071", "0.450", "+-", "0.071"]  # no gain of its own
    assert lines[3].split()[-5:] == ["+10.0", "+10.0", "..", "+10.0", "2/2"]


def test_another_slice_size_scales_the_data_the_radius_and_every_recipe(bench, tmp_path):
    """--img-size 128: the same anatomy sampled twice as finely (every axis doubled), FreMAE's
    band radius doubled (5 bins at 64 px, the paper's 10 at 128 px), the backbone and the
    slices at 128 px; a folder with 64 px data refuses it before writing anything."""
    large = budget(bench, img_size=128)
    assert bench.volume_shape(budget(bench)) == (64, 64, 32)
    assert bench.volume_shape(large) == (128, 128, 64)
    recipe = bench.pretrain_recipe("fremae", large, seed=0)
    assert recipe["objective"]["radius"] == 10 and isinstance(recipe["objective"]["radius"], int)
    assert recipe["data"]["img_size"] == recipe["backbone"]["img_size"] == 128
    assert bench.pretrain_recipe("fremae", budget(bench, img_size=96), seed=0)["objective"]["radius"] == 7.5
    assert bench.pretrain_recipe("fremae", budget(bench, img_size=128, fremae_settings={"radius": 4}),
                                 seed=0)["objective"]["radius"] == 4  # --fremae radius=... wins
    assert bench.pretrain_recipe("fremae", budget(bench), seed=0)["objective"]["radius"] == 5  # unchanged at 64 px
    assert bench.pretrain_recipe("mae", large, seed=0)["backbone"]["img_size"] == 128

    (tmp_path / "data" / "labeled").mkdir(parents=True)  # made before sizes were recorded: 64 px
    with pytest.raises(SystemExit, match="holds data of --img-size 64: pass another --work for --img-size 128"):
        bench.make_data(tmp_path, budget(bench, img_size=128, anatomy=1))
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["labeled"]


def test_a_depth_the_decoders_cannot_take_is_refused_before_anything_is_written(bench, tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setattr("sys.argv", ["pretraining_value.py", "--work", str(work), "--depth", "2"])
    with pytest.raises(SystemExit, match="--depth 2: the decoders take 4 stages from the ViT's blocks: at least 4"):
        bench.main()
    assert not work.exists()


def test_heldout_bands_print_the_ratios_without_the_encoder_where_measured(bench, tmp_path):
    default = budget(bench)
    for seed, blind in ((0, {"eval/high_ratio_no_encoder": 0.273, "eval/low_ratio_no_encoder": 0.561}), (1, {})):
        run = bench.pretrain_dir(tmp_path, "fremae", seed, default)
        run.mkdir(parents=True)
        first = {"eval/high_ratio": 0.9, "eval/low_ratio": 0.9, "step": 100}
        last = {"eval/high_ratio": 0.282, "eval/low_ratio": 0.308, **blind, "step": 200}
        run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (first, {"loss": 1.0}, last)))
    lines = bench.heldout_bands(tmp_path, ["none", "fremae"], [0, 1, 2], default).splitlines()  # seed 2: no run
    assert lines[1:] == [
        "  seed 0: high band 0.282 x (0.273 x without the encoder), low band 0.308 x (0.561 x without the encoder)",
        "  seed 1: high band 0.282 x, low band 0.308 x",  # a run from before the measurement
    ]
    # an invocation without the FreMAE arm prints none of the folder's FreMAE runs
    assert bench.heldout_bands(tmp_path, ["none", "mae"], [0, 1, 2], default) == ""
