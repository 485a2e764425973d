"""Static vs dynamic (Med-DANet V2) prediction of the same generated validation volumes, in one run.

    python benchmarks/dynamic_inference.py                      # generate, train the demo recipe, compare
    python benchmarks/dynamic_inference.py --run RUN --data DATA  # compare a trained dynamic run on DATA's validation cases

Steps: (1) ``medtune data synth`` (BraTS-like volumes: a brain, a tumour in some of the
slices); (2) ``medtune finetune --task dynamic --config configs/demo_dynamic.yaml`` (a
width-8 residual U-Net with a 32 px crop path and 8/16-bit stage selectors, 64 px
slices); (3) every validation case predicted twice by the same model, as ``medtune
predict`` does: the static whole-slice path at full precision on every slice, and the
dynamic decisions. Printed per arm: GFLOPs per volume counted with
``torch.utils.flop_counter`` (and the cost model's, quantized stages at bits/32), wall
time per volume (measured in a separate pass without FLOP counting, median of
``--repeats``), Dice ET/TC/WT on the input grid; then the ratios. The issue's goal: at
least 2.5x fewer FLOPs than the static model at a mean Dice within 1 point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train(work: Path, cases: int, steps: int | None, seed: int) -> tuple[Path, Path]:
    from medtune.cli import main

    data, run = work / "data", work / "run"
    if not data.exists():
        assert main(["data", "synth", "--out", str(data), "--cases", str(cases), "--seed", str(seed)]) == 0
    if not (run / "summary.json").exists():
        overrides = ["--set", f"train.seed={seed}"] + ([f"train.max_steps={steps}", f"train.eval_every={steps}",
                                                         f"train.save_every={steps}"] if steps else [])
        assert main(["finetune", "--task", "dynamic", "--config", str(REPO / "configs" / "demo_dynamic.yaml"),
                     "--data", str(data), "--output", str(run), *overrides]) == 0
    return run, data


def compare(run: Path, data: Path, repeats: int) -> None:
    import numpy as np
    import torch

    from medtune.data.cases import find_cases
    from medtune.data.volume import load_case
    from medtune.finetune.dynamic.inference import predict_volume
    from medtune.finetune.dynamic.predict import predict_case
    from medtune.finetune.segmentation.inference import labels_on_input, paste_probabilities
    from medtune.finetune.segmentation.metrics import dice_scores, region_masks
    from medtune.finetune.weights import load_trained

    loaded = load_trained(run)
    model, cfg = loaded.model, loaded.config
    wanted = set(loaded.derived.get("validation_cases") or [])
    cases = [c for c in find_cases(data, cfg.data.layout, cfg.data.modalities, require_labels=True)
             if not wanted or c.case_id in wanted]
    regions = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)}
    rows = {"static": {"flops": [], "cost": [], "wall": [], "dice": []},
            "dynamic": {"flops": [], "cost": [], "wall": [], "dice": []}}
    choices: dict[str, int] = {}
    for case in cases:
        volume = load_case(case, with_label=True)
        prepared = model.data_plan.prepare(volume.image, volume.affine)
        _, _, dynamic, static, _, _ = predict_case(model, volume.image, volume.affine, slice_fit=cfg.model.slice_fit)
        for choice in dynamic.slices.choices:
            choices[choice] = choices.get(choice, 0) + 1
        for arm, result, is_static in (("static", static, True), ("dynamic", dynamic, False)):
            totals = result.totals()
            rows[arm]["flops"].append(totals["flops_counted"])
            rows[arm]["cost"].append(totals["cost_model_flops"])
            times = []
            for _ in range(repeats):  # wall time without the FLOP counter
                start = time.perf_counter()
                predict_volume(model, prepared.image, slice_fit=cfg.model.slice_fit, static=is_static)
                times.append(time.perf_counter() - start)
            rows[arm]["wall"].append(statistics.median(times))
            full = paste_probabilities(result.probabilities.numpy(), prepared)
            labels = labels_on_input(full, prepared.grid, model.label_spec.values)
            dice = dice_scores(region_masks(labels, regions), region_masks(np.asarray(volume.label), regions))
            rows[arm]["dice"].append(dice.tolist())
    torch.set_printoptions(precision=4)
    n = len(cases)
    print(f"{n} validation volumes of {data} (model {run}, slice_fit {cfg.model.slice_fit}); "
          f"dynamic choices over their slices: {dict(sorted(choices.items()))}")
    print(f"{'arm':8} {'GFLOPs/vol':>11} {'cost-model':>11} {'s/vol':>8} {'Dice ET':>8} {'TC':>7} {'WT':>7} {'mean':>7}")
    summary = {}
    for arm, r in rows.items():
        gflops, cost = sum(r["flops"]) / n / 1e9, sum(r["cost"]) / n / 1e9
        wall = sum(r["wall"]) / n
        dice = np.mean(np.asarray(r["dice"]), axis=0)
        summary[arm] = (gflops, cost, wall, float(dice.mean()))
        print(f"{arm:8} {gflops:11.3f} {cost:11.3f} {wall:8.3f} {dice[0]:8.3f} {dice[1]:7.3f} {dice[2]:7.3f} "
              f"{dice.mean():7.3f}")
    s, d = summary["static"], summary["dynamic"]
    print(f"ratios static / dynamic: {s[0] / max(d[0], 1e-12):.2f}x fewer FLOPs counted, "
          f"{s[1] / max(d[1], 1e-12):.2f}x cost model, {s[2] / max(d[2], 1e-12):.2f}x wall time; "
          f"mean Dice {100 * (d[3] - s[3]):+.1f} points (goal: >= 2.5x fewer FLOPs within 1 point)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_dynamic", help="work folder (data, run), reused when run again")
    parser.add_argument("--run", default=None, help="a trained dynamic run (skips generation and training)")
    parser.add_argument("--data", default=None, help="with --run: the dataset (its validation cases are compared)")
    parser.add_argument("--cases", type=int, default=8, help="generated cases (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per volume and arm (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.run:
        if not args.data:
            parser.error("--run needs --data")
        run, data = Path(args.run), Path(args.data)
    else:
        run, data = train(Path(args.work), args.cases, args.steps, args.seed)
    compare(run, data, args.repeats)


if __name__ == "__main__":
    main()
