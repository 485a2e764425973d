"""benchmarks/pretraining_value.py reuses finished runs by folder name: a run made under other
settings (pretraining or finetuning steps, (b)'s rate or layer decay) must never be found
under the name of the default one."""

from __future__ import annotations

import importlib.util
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
                  full_lr=bench.FULL_LR, full_layer_decay=None)
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
    tags = {
        bench.run_tag(mode, budget(bench, **changes))
        for mode in ("full", "med-tuning")
        for changes in ({}, {"finetune_steps": 400}, {"full_lr": 5e-4}, {"full_layer_decay": 0.9})
    }
    assert tags == {"full", "med-tuning", "full-400steps", "med-tuning-400steps", "full-lr0.0005", "full-ld0.9"}
