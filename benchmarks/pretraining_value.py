"""Is pretraining worth it? Each pretraining objective against none, downstream, at the same budget.

    python benchmarks/pretraining_value.py                 # full: 3 seeds (see FULL for the budget)
    python benchmarks/pretraining_value.py --quick         # CI size: 1 seed, a few minutes
    python benchmarks/pretraining_value.py --work DIR --seeds 0 1 2 --arms none fremae
    python benchmarks/pretraining_value.py --work DIR --anatomy 2 --unlabeled 64 --arm-steps fremae=1000
    python benchmarks/pretraining_value.py --work DIR --anatomy 2 --img-size 128 --depth 12   # scale

Protocol, every step a medtune command or library call (run in this process):

1. data (``medtune data synth --kind brats --anatomy 1``): an *unlabeled* pool (its label
   files deleted) and a separate *labeled* set, 2 training cases and the rest for
   validation (``data.val_fraction`` picked so that exactly 2 cases train). The volumes
   carry structure a pretraining can learn: a folded cortex, ventricles, a texture per
   tissue, a bias field, partial-volume edges, four contrasts, and a tumour;
2. for each seed and objective (``fremae``, ``mae``, ``simmim``, ``mfm``): ``medtune pretrain``
   of the demo's backbone (a 4-block ViT-Tiny on 64 px slices; ``--depth``, ``--img-size``)
   on the unlabeled pool, every objective with the same steps, batch and optimizer, its own
   published masking;
3. for each seed and arm (``none`` = random initialisation, or a pretraining run):
   ``medtune finetune`` of the demo's segmentation recipe on the 2 labeled cases,
   (a) Med-Tuning adapters on the frozen backbone, (b) full finetuning, with the demo's
   UperNet decoder (``--decoder multistage``: FreMAE's light-decoder trunk, which the
   FreMAE arm takes over from its pretraining run, every other arm from scratch); the validation
   Dice per region at the last step (no checkpoint picked on the validation cases), under
   the BraTS rules (a case without a region scores 1 for an empty prediction, else 0) and,
   from the same weights, averaged over the validation cases that have the region (the
   generated sets leave ET out of every fourth case, as BraTS does; one such case among
   4 validation cases is 8 points of the mean over regions, on a single voxel);
4. a representation probe: the frozen backbone's stage maps, upsampled to the pixels, a
   ridge-regression (linear) voxel classifier fitted on the labeled training slices and
   scored (Dice per region) on the validation slices; beside it, as a reference, the same
   classifier on each pixel's own intensities and their products (no backbone, no context);
5. tables: Dice per region, mean +- std over seeds, and the gain of the mean over ``none``.

The (seed, arm) chains run side by side (``--jobs``, default 2 processes), one torch
thread each.
Finished runs and probe scores under ``--work`` are reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# this checkout's medtune, not whichever one the environment installed (worktrees may share a venv)
sys.path.insert(0, str(REPO))
OBJECTIVES = ("fremae", "mae", "simmim", "mfm")
ARMS = ("none", *OBJECTIVES)
LABELED_TRAIN_CASES = 2

# The budgets. "full": about 30 minutes on 2 idle CPU cores, estimated from step times
# measured on an idle machine (finetuning 0.3 s/step, FreMAE pretraining 0.3 s/step, one
# thread each); not yet timed end to end on an idle machine. On a 2-core machine shared at
# load 6-10 one seed of all five arms took 21 minutes in 4 processes (--jobs 4), and
# FreMAE's pretraining steps cost 4-5x those of the other objectives.
FULL = dict(unlabeled=16, labeled=6, shape=(64, 64, 32), seeds=(0, 1, 2), pretrain_steps=200,
            finetune_steps=200, batch=16, probe_pixels=20000)
QUICK = dict(unlabeled=6, labeled=4, shape=(64, 64, 32), seeds=(0,), pretrain_steps=40,
             finetune_steps=80, batch=8, probe_pixels=8000)

# Each objective's own settings at 64 px (the published ones scaled from 128-224 px).
OBJECTIVE_SECTIONS = {
    "fremae": {"name": "fremae", "radius": 5, "decoder_width": 32},  # r 10 at 128 px
    "mae": {"name": "mae", "mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2},
    "simmim": {"name": "simmim", "mask_ratio": 0.6, "mask_block": 16},  # 32 px blocks at 192 px
    "mfm": {"name": "mfm"},  # radius 16 at 224 px, scaled with the image side
}
IMG_SIZE = 64
# the backbone's blocks in configs/demo_pretrain.yaml and demo_finetune.yaml (--depth changes them)
DEMO_DEPTH = 4
# (b)'s learning rate: Med-Tuning's. At 5e-4 (the first choice) no arm's full finetuning
# found the tumour core in 200 steps (TC 0 for none, FreMAE and MAE, seed 0), so (b) could
# not tell the arms apart; at 2e-3 the randomly initialised arm reaches TC 0.50.
FULL_LR = 2.0e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "checkpoints" / "pretraining_value",
                        help="folder for the data, the runs and the tables (default checkpoints/pretraining_value)")
    parser.add_argument("--quick", action="store_true", help="CI size: 1 seed, tiny budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to run (default all)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override the pretraining steps")
    parser.add_argument("--arm-steps", nargs="*", default=[], metavar="ARM=STEPS",
                        help="pretraining steps of single arms (e.g. mae=1000 simmim=1000: an equal-time "
                        "comparison with FreMAE's slower steps; the report prints each arm's samples/s)")
    parser.add_argument("--pretrain-lr", type=float, default=None, metavar="LR",
                        help="peak learning rate of every arm's pretraining (default: configs/demo_pretrain.yaml's); "
                        "its runs are named for it (fremae-lr0.002-seed0)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="override the finetuning steps")
    parser.add_argument("--unlabeled", type=int, default=None, metavar="CASES",
                        help="cases in the unlabeled pool (default 16; --quick: 6); a pool of another size is "
                        "generated beside the default one (data/unlabeled-CASES) and its pretraining runs are "
                        "named for it; the labeled set and the runs without pretraining are shared")
    parser.add_argument("--img-size", type=int, default=IMG_SIZE, metavar="PX",
                        help=f"slice side in pixels, a multiple of 16 (default {IMG_SIZE}): the generated volumes "
                        f"are the same anatomy sampled PX/{IMG_SIZE} times as finely on every axis, FreMAE's band "
                        f"radius scales with the side, finetuning crops are PX x PX x 8. A --work folder holds "
                        "data of one size")
    parser.add_argument("--depth", type=int, default=None, metavar="BLOCKS",
                        help="the ViT-Tiny's blocks, in every arm (default 4, the demo's; 12 is timm's ViT-Tiny); "
                        "every run, the arm without pretraining's too, is named for another depth (none-d12-seed0)")
    parser.add_argument("--fremae", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra objective settings of the FreMAE arm (e.g. mask_ratio=0.5), for investigations; "
                        "its runs are named for them (fremae-mask_ratio_0.5-seed0)")
    parser.add_argument("--full-lr", type=float, default=FULL_LR,
                        help=f"learning rate of (b) full finetuning (default {FULL_LR:g}, Med-Tuning's)")
    parser.add_argument("--full-layer-decay", type=float, default=None,
                        help="layer-wise lr decay of (b) full finetuning (optim.layer_decay; default none)")
    parser.add_argument("--full-frozen-steps", type=int, default=0,
                        help="(b) full finetuning keeps the backbone at lr 0 for its first N steps, then trains "
                        "it on a restarted schedule (optim.freeze_backbone_steps, LP-FT; default 0)")
    parser.add_argument("--full-anchor-decay", type=float, default=0.0, metavar="LAMBDA",
                        help="(b) full finetuning pulls the backbone back to its starting weights by lr x LAMBDA "
                        "per step (optim.anchor_decay, decoupled L2-SP; the arm without pretraining to its "
                        "random initialisation; default 0: off)")
    parser.add_argument("--decoder", choices=("upernet", "multistage", "multistage-scratch"), default="upernet",
                        help="the segmentation decoder of (a) and (b) (default upernet, the demo's); multistage: "
                        "FreMAE's light-decoder trunk, which the FreMAE arm takes over from its pretraining run "
                        "(the whole pretrained network finetunes, as FreMIM's), every other arm from scratch; "
                        "multistage-scratch: the same decoder, every arm's from scratch (only encoders transfer)")
    parser.add_argument("--anatomy", type=int, choices=(1, 2), default=1,
                        help="the generated data (medtune data synth --anatomy): 1 (default) anatomy-like "
                        "healthy tissue, each tumour class with its own contrast; 2: tumour contrasts that "
                        "overlap healthy tissue and vary by case (a voxel's intensities no longer decide its "
                        "class). A --work folder holds data of one level only")
    parser.add_argument("--jobs", type=int, default=2, help="(seed, arm) chains run side by side (default 2 processes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these tiny models only lose time to more threads, "
                        "and far more so on a shared machine)")
    return parser.parse_args()


def medtune(*argv: str) -> None:
    from medtune.cli import main

    print("$ medtune " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code != 0:
        sys.exit(f"medtune {argv[0]} failed (exit {code})")


# --------------------------------------------------------------------------- data


def volume_shape(budget: dict) -> tuple[int, ...]:
    """The generated volumes' shape: the scale's, every axis times ``img_size / 64`` (the same
    anatomy and tumours, sampled more finely)."""
    return tuple(n * budget["img_size"] // IMG_SIZE for n in budget["shape"])


def make_data(work: Path, budget: dict) -> tuple[Path, Path, float]:
    """The unlabeled pool and the labeled set; returns their folders and the labeled
    set's ``val_fraction`` that leaves exactly 2 training cases."""
    from medtune.data.cases import find_cases
    from medtune.data.config import split_cases

    shape = [str(n) for n in volume_shape(budget)]
    unlabeled, labeled = unlabeled_dir(work, budget), work / "data" / "labeled"
    older = any((work / "data" / name).exists() for name in ("unlabeled", "labeled"))  # made before these were recorded
    recorded = {  # option: (its record, this run's value, an older folder's)
        "anatomy": (work / "data" / "anatomy.txt", str(budget["anatomy"]), "1"),
        "img-size": (work / "data" / "img_size.txt", str(budget["img_size"]), str(IMG_SIZE)),
    }
    for key, (record, value, before) in recorded.items():
        made = record.read_text().strip() if record.is_file() else (before if older else value)
        if made != value:  # every run under work/ was made from that data
            sys.exit(f"{work} holds data of --{key} {made}: pass another --work for --{key} {value}")
    (work / "data").mkdir(parents=True, exist_ok=True)
    for record, value, _ in recorded.values():
        record.write_text(value + "\n")
    level = str(budget["anatomy"])
    if not unlabeled.exists():
        medtune("data", "synth", "--kind", "brats", "--anatomy", level, "--cases", str(budget["unlabeled"]),
                "--shape", *shape, "--seed", "1", "--out", str(unlabeled))
        for label_file in unlabeled.rglob("*_seg.nii.gz"):
            label_file.unlink()  # unlabeled: pretraining never sees a label
    if not labeled.exists():
        medtune("data", "synth", "--kind", "brats", "--anatomy", level, "--cases", str(budget["labeled"]),
                "--shape", *shape, "--seed", "2", "--out", str(labeled))
    count = budget["labeled"]
    val_fraction = (count - LABELED_TRAIN_CASES) / count
    train, _ = split_cases(find_cases(labeled, require_labels=True), val_fraction)
    if len(train) != LABELED_TRAIN_CASES:
        sys.exit(f"val_fraction {val_fraction} leaves {len(train)} training cases, not {LABELED_TRAIN_CASES}")
    return unlabeled, labeled, val_fraction


# --------------------------------------------------------------------------- runs


def scaled_backbone(recipe: dict, budget: dict) -> dict:
    """A demo recipe (parsed YAML) with its backbone at the budget's depth and slice side (in
    place, returned); the finetuning runs get the same through ``--set``."""
    recipe["backbone"]["options"]["depth"] = budget["depth"]
    recipe["backbone"]["img_size"] = budget["img_size"]
    return recipe


def pretrain_recipe(objective: str, budget: dict, seed: int) -> dict:
    """The demo's pretraining recipe with this objective's section and the shared budget."""
    recipe = scaled_backbone(yaml.safe_load((REPO / "configs" / "demo_pretrain.yaml").read_text()), budget)
    steps = budget["pretrain_steps"]
    extra = budget.get("fremae_settings", {}) if objective == "fremae" else {}  # --fremae
    recipe["objective"] = {**OBJECTIVE_SECTIONS[objective], **extra}
    size = recipe["data"]["img_size"] = budget["img_size"]
    if objective == "fremae" and "radius" not in extra and size != IMG_SIZE:  # the radius in bins scales with the side
        radius = OBJECTIVE_SECTIONS["fremae"]["radius"] * size / IMG_SIZE
        recipe["objective"]["radius"] = int(radius) if radius.is_integer() else radius
    recipe["train"].update(max_steps=steps, batch_size=budget["batch"], save_every=steps, log_every=max(1, steps // 10),
                           seed=seed)
    recipe["train"]["schedule"]["warmup_steps"] = max(1, steps // 10)
    if budget.get("pretrain_lr") is not None:
        recipe["train"]["optim"]["lr"] = budget["pretrain_lr"]
    recipe["figure"] = objective == "fremae"
    return recipe


def pretrain_steps(arm: str, budget: dict) -> int:
    """The pretraining steps of ``arm`` (``--arm-steps``, else the budget's)."""
    return budget["arm_steps"].get(arm, budget["pretrain_steps"])


def arm_label(arm: str, budget: dict) -> str:
    """The arm's name in run folders and tables: the objective, with its pretraining steps,
    learning rate and unlabeled pool's size when they are not the scale's default, FreMAE's
    ``--fremae`` settings, and the backbone's depth when it is not the demo's, for the arm
    without pretraining too (so a cached run is never reused at other steps, on another
    pool, with other settings or on another backbone)."""
    depth = budget["depth"]
    if arm == "none":
        return arm if depth == DEMO_DEPTH else f"{arm}-d{depth}"
    steps = pretrain_steps(arm, budget)
    label = arm if steps == budget["default_pretrain_steps"] else f"{arm}-{steps}"
    if arm == "fremae":  # --fremae settings, e.g. fremae-mask_mode_patch-mask_ratio_0.75
        label += "".join(f"-{key}_{re.sub(r'[^A-Za-z0-9.]+', '.', str(value)).strip('.')}"
                         for key, value in sorted(budget.get("fremae_settings", {}).items()))
    label += "" if budget.get("pretrain_lr") is None else f"-lr{budget['pretrain_lr']:g}"
    label += "" if budget["unlabeled"] == budget["default_unlabeled"] else f"-u{budget['unlabeled']}"
    return label if depth == DEMO_DEPTH else f"{label}-d{depth}"


def unlabeled_dir(work: Path, budget: dict) -> Path:
    """The unlabeled pool: ``data/unlabeled`` at the scale's default size, else ``data/unlabeled-CASES``."""
    default = budget["unlabeled"] == budget["default_unlabeled"]
    return work / "data" / ("unlabeled" if default else f"unlabeled-{budget['unlabeled']}")


def pretrain_dir(work: Path, arm: str, seed: int, budget: dict) -> Path:
    """The pretraining run of ``arm`` at ``seed``."""
    return work / "pretrain" / f"{arm_label(arm, budget)}-seed{seed}"


def finetune_name(mode: str, arm: str, seed: int, budget: dict) -> str:
    """The name of a finetuning run (its folder under finetune/, its scores under scores/)."""
    return f"{run_tag(mode, budget)}-{arm_label(arm, budget)}-seed{seed}"


def pretrain(work: Path, unlabeled: Path, objective: str, seed: int, budget: dict) -> Path:
    run = pretrain_dir(work, objective, seed, budget)
    if not (run / "backbone.safetensors").is_file():
        shutil.rmtree(run, ignore_errors=True)
        recipe_file = work / "recipes" / f"pretrain-{run.name}.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe = pretrain_recipe(objective, {**budget, "pretrain_steps": pretrain_steps(objective, budget)}, seed)
        recipe_file.write_text(yaml.safe_dump(recipe))
        medtune("pretrain", "--config", str(recipe_file), "--data", str(unlabeled), "--output", str(run))
        drop_resumable_state(run)
    return run


def finetune(work: Path, labeled: Path, val_fraction: float, arm: str, mode: str, seed: int, budget: dict) -> dict:
    """Validation Dice per region at the last step of one finetuning run."""
    run = work / "finetune" / finetune_name(mode, arm, seed, budget)
    if not (run / "summary.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        steps = budget["finetune_steps"]
        backbone = [] if arm == "none" else ["--backbone", str(pretrain_dir(work, arm, seed, budget))]
        if backbone and budget["decoder"] == "multistage-scratch":  # a weight file brings no decoder blocks
            backbone[1] = str(pretrain_dir(work, arm, seed, budget) / "backbone.safetensors")
        sets = [
            f"data.val_fraction={val_fraction}", f"train.max_steps={steps}", f"train.seed={seed}",
            f"train.eval_every={steps}", f"train.save_every={steps}", f"train.log_every={max(1, steps // 5)}",
            f"train.schedule.warmup_steps={max(1, steps // 10)}",
            f"backbone.options.depth={budget['depth']}",  # as scaled_backbone; a pretraining run's has it too
            f"backbone.img_size={budget['img_size']}",
            f"data.crop_size=[{budget['img_size']}, {budget['img_size']}, 8]",
        ]
        if budget["decoder"] != "upernet":  # the width FreMAE's decoder was pretrained with
            width = OBJECTIVE_SECTIONS["fremae"]["decoder_width"]
            sets += ["model.decoder=multistage", f'model.decoder_options={{"width": {width}}}']
            if arm == "fremae" and budget["decoder"] == "multistage" and not (pretrain_dir(work, arm, seed, budget) / "decoder.safetensors").is_file():
                sys.exit(f"{pretrain_dir(work, arm, seed, budget)} has no decoder.safetensors (a run of an older "
                         "medtune): delete it so that it is pretrained again")
        if mode == "full":
            sets += ['adapter={"method": "full"}', f"train.optim.lr={budget['full_lr']}"]
            if budget["full_layer_decay"] is not None:
                sets.append(f"train.optim.layer_decay={budget['full_layer_decay']}")
            if budget.get("full_frozen_steps"):
                sets.append(f"train.optim.freeze_backbone_steps={budget['full_frozen_steps']}")
            if budget.get("full_anchor_decay"):
                sets.append(f"train.optim.anchor_decay={budget['full_anchor_decay']}")
        medtune("finetune", "--config", str(REPO / "configs" / "demo_finetune.yaml"), "--data", str(labeled),
                *backbone, "--output", str(run), "--set", *sets)
        drop_resumable_state(run)
    summary = json.loads((run / "summary.json").read_text())
    return {k[len("Dice_"):]: v for k, v in summary["final"].items() if k.startswith("Dice_")}


def drop_resumable_state(run: Path) -> None:
    """Delete a finished run's resumable state (weights, optimizer moments, RNG): the
    benchmark reuses a run by its weight files and ``summary.json`` only, and the states are
    nearly half of a work folder (one of 10 seeds and several settings: 16 GB, 9 GB without)."""
    from medtune.checkpoints.runs import STATE_DIR

    shutil.rmtree(run / STATE_DIR, ignore_errors=True)


def run_tag(mode: str, budget: dict) -> str:
    """A finetuning run's folder prefix: the mode, the decoder when it is not UperNet, the
    steps when they are not the scale's default, and full finetuning's learning rate and
    layer decay when they are not the defaults, its frozen-backbone steps and its L2-SP pull
    (so a cached run is never reused under other settings)."""
    tag = mode if budget.get("decoder", "upernet") == "upernet" else f"{mode}-{budget['decoder']}"
    if budget["finetune_steps"] != budget["default_finetune_steps"]:
        tag += f"-{budget['finetune_steps']}steps"
    if mode != "full":
        return tag
    tag += f"-lr{budget['full_lr']:g}" if budget["full_lr"] != FULL_LR else ""
    tag += "" if budget.get("full_layer_decay") is None else f"-ld{budget['full_layer_decay']:g}"
    tag += f"-frozen{budget['full_frozen_steps']}" if budget.get("full_frozen_steps") else ""
    return f"{tag}-anchor{budget['full_anchor_decay']:g}" if budget.get("full_anchor_decay") else tag


def present_scores(work: Path, arm: str, mode: str, seed: int, budget: dict) -> dict:
    """Dice per region of one finetuning run's last weights, averaged over the validation
    cases whose ground truth has the region (a case without ET is not scored on ET),
    beside the BraTS-rule mean the run logged. Under the BraTS rules a case without a
    region scores 1 for an empty prediction and 0 for a single predicted voxel: with 4
    validation cases one such case moves the mean over regions by 8 Dice points."""
    import torch

    from medtune.data.config import build_labeled_dataset
    from medtune.finetune.segmentation.inference import sliding_window_probs
    from medtune.finetune.segmentation.metrics import dice_scores
    from medtune.finetune.weights import load_trained

    scores = work / "scores" / f"{finetune_name(mode, arm, seed, budget)}.json"
    if scores.is_file():
        return json.loads(scores.read_text())
    run = work / "finetune" / finetune_name(mode, arm, seed, budget)
    loaded = load_trained(run, "last")
    model, cfg, spec = loaded.model, loaded.config, loaded.model.label_spec
    val = build_labeled_dataset(cfg.data, "val", run_dir=run, show_progress=False)
    dice, present = [], []
    with torch.no_grad():
        for index in range(len(val)):
            item = val[index]
            probs = sliding_window_probs(model, item["image"], cfg.roi_size, overlap=cfg.validation.overlap,
                                         sw_batch_size=cfg.validation.sw_batch_size, tta=cfg.validation.tta,
                                         mode=cfg.validation.mode)  # (K, h, w, d)
            truth = spec.index_region_masks(torch.as_tensor(item["label"]))  # (R, h, w, d)
            dice.append(dice_scores(spec.index_region_masks(probs.argmax(0)), truth).tolist())
            present.append(truth.flatten(1).any(1).tolist())
    result = {}
    for r, name in enumerate(spec.region_names):
        kept = [case[r] for case, has in zip(dice, present) if has[r]]
        result[name] = sum(kept) / len(kept) if kept else float("nan")
    result["mean"] = sum(result[name] for name in spec.region_names) / len(spec.region_names)
    logged = json.loads((run / "summary.json").read_text())["final"]["Dice_mean"]
    rescored = sum(sum(case) / len(case) for case in dice) / len(dice)
    if abs(rescored - logged) > 1e-4:  # the same weights and cases: the same BraTS-rule score
        print(f"warning: {run.name} rescored {rescored:.4f} under the BraTS rules, the run logged {logged:.4f}")
    scores.parent.mkdir(parents=True, exist_ok=True)
    scores.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- probe


INTENSITY = "intensity"  # the probe's reference: each pixel's own intensities, no backbone


class PixelIntensities:
    """The probe's reference in place of a backbone: each pixel's M intensities and their
    pairwise products, at full resolution (a quadratic classifier once the probe's linear one
    reads them)."""

    def eval(self) -> "PixelIntensities":
        return self

    def forward_stages(self, image):  # (B, M, s, s) -> [(B, M + M(M+1)/2, s, s)]
        import torch

        m = image.shape[1]
        products = [image[:, i:i + 1] * image[:, j:j + 1] for i in range(m) for j in range(i, m)]
        return [torch.cat([image, *products], 1)]


def probe(work: Path, labeled: Path, val_fraction: float, arm: str, seed: int, budget: dict) -> dict:
    """Dice per region of a ridge-regression voxel classifier on the frozen backbone's
    upsampled stage maps (fitted on the training slices, scored on the validation slices).

    ``arm`` :data:`INTENSITY`: the same classifier on each pixel's own M intensities and their
    pairwise products (no backbone, no spatial context): how much of the task a pixel's
    intensities alone decide, i.e. what a decoder with a full-resolution path of the input
    can reach without any representation."""
    import numpy as np
    import torch

    from medtune.config import from_dict
    from medtune.data.config import DataConfig, build_labeled_dataset, label_spec_for
    from medtune.data.datasets import SliceDataset
    from medtune.models import BackboneConfig, create_backbone, load_pretrained

    if arm == INTENSITY:
        backbone = PixelIntensities()
    elif arm == "none":
        recipe = scaled_backbone(yaml.safe_load((REPO / "configs" / "demo_finetune.yaml").read_text()), budget)
        torch.manual_seed(seed)
        backbone = create_backbone(from_dict(BackboneConfig, recipe["backbone"]))
    else:
        run = pretrain_dir(work, arm, seed, budget)
        config = json.loads((run / "config.json").read_text())
        backbone = create_backbone(from_dict(BackboneConfig, config["backbone"]))
        load_pretrained(backbone, run / "backbone.safetensors")
    backbone.eval()
    size = budget["img_size"]
    data = DataConfig(root=str(labeled), mode="2d", img_size=size, val_fraction=val_fraction, num_workers=0,
                      cache_dir=str(work / "data" / ".probe-cache"))
    spec = label_spec_for(data)
    train = build_labeled_dataset(data, "train", show_progress=False)
    val = build_labeled_dataset(data, "val", show_progress=False)
    val = SliceDataset(val.cache, size, with_label=True, label_spec=spec)

    def stage_maps(items) -> tuple[torch.Tensor, tuple[int, int]]:
        image = torch.stack([torch.as_tensor(item["image"]) for item in items])  # (B, M, s, s)
        with torch.no_grad():
            return torch.cat(backbone.forward_stages(image), 1), tuple(image.shape[2:])  # (B, C, s/16, s/16)

    def upsampled(maps: torch.Tensor, size) -> torch.Tensor:
        return torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)

    def batches(dataset):
        for start in range(0, len(dataset), 16):
            yield [dataset[i] for i in range(start, min(start + 16, len(dataset)))]

    def labels_of(dataset) -> tuple[np.ndarray, np.ndarray]:
        y = np.concatenate([np.asarray(item["label"]).ravel() for item in (dataset[i] for i in range(len(dataset)))])
        fg = np.concatenate([np.asarray(item["foreground"]).ravel() for item in (dataset[i] for i in range(len(dataset)))])
        return y, fg

    # fit: class-balanced brain pixels of the training slices (tumour classes are a few percent)
    y, fg = labels_of(train)
    rng = np.random.default_rng(seed)
    per_class = budget["probe_pixels"] // len(spec.values)
    chosen = np.sort(np.concatenate([
        rng.choice(pool, size=min(per_class, len(pool)), replace=False)
        for pool in (np.flatnonzero(fg & (y == k)) for k in range(len(spec.values))) if len(pool)
    ]))
    features, offset = [], 0
    for items in batches(train):
        maps, size = stage_maps(items)
        flat = upsampled(maps, size).permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).numpy()  # (B*s*s, C)
        inside = chosen[(chosen >= offset) & (chosen < offset + len(flat))] - offset
        features.append(flat[inside])
        offset += len(flat)
    x = np.concatenate(features)
    mean, std = x.mean(0), x.std(0) + 1e-6
    design = (x - mean) / std
    targets = np.eye(len(spec.values))[y[chosen]]
    weights = np.linalg.solve(design.T @ design + 10.0 * np.eye(design.shape[1]), design.T @ (targets - targets.mean(0)))
    # score: the classifier is linear, so it runs on the stage maps and its logits are upsampled
    w = torch.from_numpy((weights / std[:, None]).T.astype(np.float32))  # (K, C)
    b = torch.from_numpy((targets.mean(0) - (mean / std) @ weights).astype(np.float32))  # (K,)
    predicted = []
    for items in batches(val):
        maps, size = stage_maps(items)
        logits = torch.einsum("kc,bchw->bkhw", w, maps) + b.view(1, -1, 1, 1)
        predicted.append(upsampled(logits, size).argmax(1).reshape(-1).numpy())
    y, fg = labels_of(val)
    predicted = np.where(fg, np.concatenate(predicted), 0)
    truth_regions = spec.region_masks(spec.to_values(y))
    predicted_regions = spec.region_masks(spec.to_values(predicted))
    scores = {}
    for name, truth, guess in zip(spec.region_names, truth_regions, predicted_regions):
        total = truth.sum() + guess.sum()
        scores[name] = 1.0 if total == 0 else float(2 * (truth & guess).sum() / total)
    scores["mean"] = sum(scores.values()) / len(spec.region_names)
    return scores


# --------------------------------------------------------------------------- tables


def paired_gain(base: list[float], arm: list[float]) -> tuple[float, float, int]:
    """The gain of ``arm`` over ``base``, paired by seed: the mean of the per-seed
    differences, the half-width of its 95% confidence interval (Student's t with n - 1
    degrees of freedom; nan for one seed) and the number of seeds where ``arm`` is ahead.

    Pairing takes out what a seed does to both arms alike (the finetuning's initialisation
    and crop order); the interval says whether the seeds resolve a gain of a given size.
    """
    from scipy import stats

    differences = [a - b for a, b in zip(arm, base, strict=True)]
    count, ahead = len(differences), sum(d > 0 for d in differences)
    if count < 2:
        return differences[0], math.nan, ahead
    half_width = stats.t.ppf(0.975, count - 1) * statistics.stdev(differences) / math.sqrt(count)
    return statistics.mean(differences), float(half_width), ahead


def table(title: str, results: dict[str, list[dict]], baseline: str = "none") -> str:
    """Dice per region, mean +- std over seeds, and the mean's gain over the row ``baseline``
    (the arm without pretraining's label, ``none-d12`` at another depth; points) with its 95%
    interval paired by seed and the seeds where the arm is ahead of it."""
    keys = [k for k in next(iter(results.values()))[0] if k != "mean"] + ["mean"]
    width = max(12, *(len(arm) for arm in results))  # run labels grow with --arm-steps, --unlabeled, --fremae
    lines = [title, f"{'arm':{width}s}" + "".join(f"{k:>18s}" for k in keys)
             + f"{'gain vs none':>15s}{'95% CI (paired)':>18s}{'seeds ahead':>13s}"]
    base = [r["mean"] for r in results[baseline]] if baseline in results else None
    for arm, runs in results.items():
        cells = []
        for key in keys:
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):9.3f} +- {spread:.3f}")
        gain = interval = ahead = ""
        if base is not None and arm != baseline:
            mean, half_width, wins = paired_gain(base, [r["mean"] for r in runs])
            gain = f"{100 * mean:+.1f}"
            low, high = 100 * (mean - half_width), 100 * (mean + half_width)
            interval = "" if math.isnan(half_width) else f"{low:+.1f} .. {high:+.1f}"
            ahead = f"{wins}/{len(runs)}"
        lines.append(f"{arm:{width}s}" + "".join(f"{c:>18s}" for c in cells) + f"{gain:>15s}{interval:>18s}{ahead:>13s}")
    return "\n".join(lines)


def intensity_reference(scores: dict) -> str:
    """The probe's reference line (:data:`INTENSITY`)."""
    regions = "  ".join(f"{name} {value:.3f}" for name, value in scores.items() if name != "mean")
    return ("probe's reference, no backbone: the same classifier on each pixel's own intensities and their "
            f"products (no spatial context): {regions}  mean {scores['mean']:.3f}\n"
            "(what a decoder with a full-resolution path of the input can reach without any representation)")


def heldout_bands(work: Path, arms: list[str], seeds: list[int], budget: dict) -> str:
    """FreMAE's held-out band ratios (the run's last evaluation) per seed, and with the
    encoder's maps zeroed (runs of a medtune that measured it); nothing when FreMAE is not
    one of ``arms`` (a work folder keeps the runs of earlier invocations)."""
    if "fremae" not in arms:
        return ""
    lines = []
    for seed in seeds:
        metrics = pretrain_dir(work, "fremae", seed, budget) / "metrics.jsonl"
        if metrics.is_file():
            last = [json.loads(line) for line in metrics.read_text().splitlines() if "eval/high_ratio" in line][-1]
            parts = []
            for band in ("high", "low"):
                part, blind = f"{band} band {last[f'eval/{band}_ratio']:.3f} x", last.get(f"eval/{band}_ratio_no_encoder")
                parts.append(part if blind is None else f"{part} ({blind:.3f} x without the encoder)")
            lines.append(f"  seed {seed}: " + ", ".join(parts))
    return ("FreMAE held-out band loss / zero-prediction loss (without the encoder: its stage maps zeroed):\n"
            + "\n".join(lines) if lines else "")


def pretraining_cost(work: Path, arms: list[str], seeds: list[int], budget: dict) -> str:
    """Each arm's pretraining steps, throughput (the mean of the logged samples/s over its
    runs) and the time its steps take at that pace: what an equal-time comparison
    (``--arm-steps``) is set from. The runs share the machine, so the pace is a guide."""
    lines = []
    for arm in arms:
        paces = []
        for seed in seeds:
            metrics = pretrain_dir(work, arm, seed, budget) / "metrics.jsonl"
            if metrics.is_file():
                paces += [row["samples_per_s"] for row in map(json.loads, metrics.read_text().splitlines())
                          if "samples_per_s" in row]
        if paces:
            steps, pace = pretrain_steps(arm, budget), statistics.mean(paces)
            lines.append(f"  {arm_label(arm, budget):12s} {steps:5d} steps  {pace:6.1f} samples/s  "
                         f"{steps * budget['batch'] / pace / 60:5.1f} min per run")
    return "pretraining cost (samples/s logged by the runs):\n" + "\n".join(lines) if lines else ""


def run_arm(work: Path, arm: str, seed: int, budget: dict, threads: int) -> dict:
    """One arm of one seed (its pretraining, both finetunings, the probe), in one process."""
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    unlabeled, labeled, val_fraction = make_data(work, budget)
    if arm != "none":
        pretrain(work, unlabeled, arm, seed, budget)
    results = {mode: finetune(work, labeled, val_fraction, arm, mode, seed, budget) for mode in ("med-tuning", "full")}
    for mode in ("med-tuning", "full"):
        results[f"{mode} present"] = present_scores(work, arm, mode, seed, budget)
    scores = work / "probe" / f"{arm_label(arm, budget)}-seed{seed}-{budget['probe_pixels']}px.json"
    if not scores.is_file():
        scores.parent.mkdir(parents=True, exist_ok=True)
        scores.write_text(json.dumps(probe(work, labeled, val_fraction, arm, seed, budget)))
    results["probe"] = json.loads(scores.read_text())
    return results


def main() -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    args = parse_args()
    budget = dict(QUICK if args.quick else FULL)
    budget["default_pretrain_steps"] = budget["pretrain_steps"]
    budget["default_finetune_steps"] = budget["finetune_steps"]
    budget["default_unlabeled"] = budget["unlabeled"]
    if args.unlabeled is not None:
        if args.unlabeled < 1:
            sys.exit(f"--unlabeled {args.unlabeled}: the pool needs at least one case")
        budget["unlabeled"] = args.unlabeled
    budget["arm_steps"] = {}
    for item in args.arm_steps:
        arm, _, steps = item.partition("=")
        if arm not in OBJECTIVES or not steps.isdigit() or int(steps) < 1:
            sys.exit(f"--arm-steps {item!r}: expected OBJECTIVE=STEPS with OBJECTIVE one of {', '.join(OBJECTIVES)}")
        budget["arm_steps"][arm] = int(steps)
    if args.pretrain_steps:
        budget["pretrain_steps"] = args.pretrain_steps
    if args.finetune_steps:
        budget["finetune_steps"] = args.finetune_steps
    budget["full_lr"] = args.full_lr
    budget["full_layer_decay"] = args.full_layer_decay
    budget["full_frozen_steps"] = args.full_frozen_steps
    budget["full_anchor_decay"] = args.full_anchor_decay
    budget["pretrain_lr"] = args.pretrain_lr
    budget["decoder"] = args.decoder
    budget["anatomy"] = args.anatomy
    if args.depth is not None and args.depth < 4:  # medtune's ViT gives its 4 stages from 4 blocks or more
        sys.exit(f"--depth {args.depth}: the decoders take 4 stages from the ViT's blocks: at least 4")
    budget["depth"] = DEMO_DEPTH if args.depth is None else args.depth
    if args.img_size < 16 or args.img_size % 16:
        sys.exit(f"--img-size {args.img_size}: expected a multiple of the ViT's patch, 16")
    budget["img_size"] = args.img_size
    seeds = args.seeds if args.seeds is not None else list(budget["seeds"])
    if any("=" not in item for item in args.fremae):
        sys.exit(f"--fremae {' '.join(args.fremae)}: expected KEY=VALUE items (e.g. mask_ratio=0.5)")
    budget["fremae_settings"] = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.fremae)}
    arms = [a for a in ARMS if a in args.arms]
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    _, labeled, val_fraction = make_data(args.work, budget)  # once, before the seeds share it
    jobs = [(args.work, arm, seed, budget, args.threads) for seed in seeds for arm in arms]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_arm, *zip(*jobs)))
    else:
        done = [run_arm(*job) for job in jobs]
    modes = ("med-tuning", "med-tuning present", "full", "full present", "probe")
    results = {mode: {arm_label(arm, budget): [r[mode] for job, r in zip(jobs, done) if job[1] == arm] for arm in arms}
               for mode in modes}
    minutes = (time.perf_counter() - start) / 60
    none = arm_label("none", budget)  # the row the gains are over
    scale = "quick" if args.quick else "full"
    report = "\n\n".join(part for part in [
        f"pretraining value ({scale}, data --anatomy {budget['anatomy']}: {len(seeds)} seed(s), pretraining {budget['pretrain_steps']} steps"
        + "".join(f", {arm} {steps}" for arm, steps in budget["arm_steps"].items() if arm in arms)
        + ("" if budget.get("pretrain_lr") is None else f" at learning rate {budget['pretrain_lr']:g}") + " of "
        f"{budget['batch']} slices on {budget['unlabeled']} unlabeled cases, finetuning {budget['finetune_steps']} "
        f"steps on {LABELED_TRAIN_CASES} labeled cases with decoder {budget['decoder']}, a {budget['depth']}-block ViT-Tiny on {budget['img_size']} px slices"
        + (" (the FreMAE arm's trunk pretrained)" if budget["decoder"] == "multistage" else "")
        + f"; Dice per region on {budget['labeled'] - LABELED_TRAIN_CASES} validation cases; gain in Dice points)",
        table("(a) Med-Tuning on the frozen backbone: validation Dice at the last step (BraTS rules)",
              results["med-tuning"], none),
        table("(a) the same runs, each region averaged over the validation cases that have it",
              results["med-tuning present"], none),
        table(f"(b) full finetuning (learning rate {budget['full_lr']:g}"
              + (f", layer decay {budget['full_layer_decay']:g}" if budget["full_layer_decay"] is not None else "")
              + (f", backbone frozen for its first {budget['full_frozen_steps']} steps"
                 if budget["full_frozen_steps"] else "")
              + (f", L2-SP pull {budget['full_anchor_decay']:g} x the lr to the starting weights"
                 if budget.get("full_anchor_decay") else "")
              + "): validation Dice at the last step "
              "(BraTS rules)", results["full"], none),
        table("(b) the same runs, each region averaged over the validation cases that have it",
              results["full present"], none),
        table("probe: linear voxel classifier on frozen features, validation Dice", results["probe"], none),
        intensity_reference(probe(args.work, labeled, val_fraction, INTENSITY, 0, budget)),
        heldout_bands(args.work, arms, seeds, budget),
        pretraining_cost(args.work, [a for a in arms if a != "none"], seeds, budget),
        f"wall time {minutes:.1f} min ({args.jobs} process(es), {args.threads} torch thread(s) each)",
    ] if part)
    print("\n" + report)
    (args.work / f"pretraining_value_{scale}.txt").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
