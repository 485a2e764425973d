"""FreMAE's downstream protocol: the whole SwinUNETR finetuned from a FreMAE run and from scratch.

    python benchmarks/pretrained_vs_scratch.py --work checkpoints/pvs --data /data/BraTS2020
    python benchmarks/pretrained_vs_scratch.py --work runs/pvs --tiny      # minutes on a CPU

Each step is one medtune command (run in this process, the same as typing it):

1. without ``--data``: ``medtune data synth --kind brats`` (a generated BraTS-like set);
2. ``medtune pretrain --config configs/fremae_swinunetr2d_brats.yaml --data D --output WORK/pretrain``;
3. ``medtune finetune --config configs/swinunetr2d_full_brats.yaml --data D --backbone WORK/pretrain
   --output WORK/pretrained`` (encoder and UNETR blocks from the run);
4. the same without ``--backbone``, ``--output WORK/scratch`` (random initialisation, same budget);
5. both Dice tables: the best validation Dice per region of each run (its ``summary.json``).

``--tiny`` shrinks every recipe with ``--set`` (64 px, feature size 12, one block per
stage, a few hundred steps): a smoke run of the protocol on generated data, not a
result. Finished steps are reused when the script is run again on the same ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_RECIPE = REPO / "configs" / "fremae_swinunetr2d_brats.yaml"
FINETUNE_RECIPE = REPO / "configs" / "swinunetr2d_full_brats.yaml"
TINY_BACKBONE = [
    "backbone.img_size=64", "backbone.options.feature_size=12",
    "backbone.options.depths=[1,1,1,1]", "backbone.options.num_heads=[1,1,1,1]",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for the data, the three runs and the tables")
    parser.add_argument("--data", type=Path, default=None, help="a BraTS/MSD dataset (default: generate one)")
    parser.add_argument("--tiny", action="store_true", help="tiny network and budget: a smoke run on a CPU")
    parser.add_argument("--cases", type=int, default=10, help="generated cases without --data (default 10)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override train.max_steps of pretraining")
    parser.add_argument("--finetune-steps", type=int, default=None, help="override train.max_steps of both finetunings")
    return parser.parse_args()


def medtune(*argv: str) -> None:
    from medtune.cli import main

    print("\n$ medtune " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code != 0:
        sys.exit(f"medtune {argv[0]} failed (exit {code})")


def overrides(args: argparse.Namespace, stage: str) -> list[str]:
    sets = []
    if args.tiny and stage == "pretrain":
        steps = args.pretrain_steps or 300
        sets = TINY_BACKBONE + [
            "data.img_size=64", "data.num_workers=0", "train.batch_size=8", "train.grad_accum=1",
            f"train.max_steps={steps}", f"train.save_every={steps}", "train.log_every=25",
            f"train.schedule.warmup_steps={steps // 20}", "train.optim.lr=5.0e-4", "figure=false",
        ]
    elif args.tiny:
        steps = args.finetune_steps or 300
        sets = TINY_BACKBONE + [
            "data.crop_size=[64,64,8]", "data.num_workers=0", "data.val_fraction=0.3", "train.batch_size=2",
            f"train.max_steps={steps}", f"train.eval_every={steps // 3}", f"train.save_every={steps}",
            "train.log_every=25", f"train.schedule.warmup_steps={steps // 20}", "train.optim.lr=5.0e-4",
            "validation.overlap=0.25", "validation.sw_batch_size=1",
        ]
    else:
        if stage == "pretrain" and args.pretrain_steps:
            sets.append(f"train.max_steps={args.pretrain_steps}")
        if stage == "finetune" and args.finetune_steps:
            sets.append(f"train.max_steps={args.finetune_steps}")
    return ["--set", *sets] if sets else []


def dice_table(runs: dict[str, Path]) -> str:
    summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    keys = sorted({k for s in summaries.values() for k in (s.get("best") or {}) if k.startswith("Dice_")},
                  key=lambda k: (k == "Dice_mean", k))
    lines = [f"{'':12s}" + "".join(f"{k:>11s}" for k in keys) + f"{'best step':>11s}"]
    for name, summary in summaries.items():
        best = summary.get("best") or {}
        lines.append(f"{name:12s}" + "".join(f"{best.get(k, float('nan')):11.4f}" for k in keys)
                     + f"{summary.get('best_step', '-')!s:>11s}")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = work / "data"
        if not data.exists():
            shape = ["64", "64", "32"] if args.tiny else ["128", "128", "96"]
            medtune("data", "synth", "--kind", "brats", "--out", str(data), "--cases", str(args.cases),
                    "--shape", *shape, "--seed", "0")
    pretrain = work / "pretrain"
    if not (pretrain / "decoder.safetensors").is_file():
        medtune("pretrain", "--config", str(PRETRAIN_RECIPE), "--data", str(data), "--output", str(pretrain),
                *overrides(args, "pretrain"))
    runs = {"pretrained": work / "pretrained", "scratch": work / "scratch"}
    for name, run in runs.items():
        if (run / "summary.json").is_file():
            continue
        backbone = ["--backbone", str(pretrain)] if name == "pretrained" else []
        medtune("finetune", "--config", str(FINETUNE_RECIPE), "--data", str(data), *backbone,
                "--output", str(run), *overrides(args, "finetune"))
    table = dice_table(runs)
    scale = "tiny network and budget, generated data: a smoke run, not a result" if args.tiny else "full recipes"
    print(f"\nbest validation Dice ({scale}; data {data}):\n{table}")
    (work / "dice_tables.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
