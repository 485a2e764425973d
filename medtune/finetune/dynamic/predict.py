"""``medtune predict`` for dynamic runs, and their validation: label maps and a FLOPs report per case.

Per case, next to ``<case>.nii.gz`` (the input's grid, affine and header, as segmentation
prediction writes it), ``<case>.dynamic.json``::

    {"case": ..., "slice_fit": "pad", "slice_size": [h, w], "fitted_size": [H, W],
     "slices": [{"index": z, "choice": "skip" | "crop" | "whole" | "whole_w8" | "empty" | "outside",
                 "bits": [16, 8, 8, 16] | null, "crop_origin": [y, x] | null,   # bits per quantized unit
                 "flops": counted, "decision_flops": counted, "path_flops": counted,
                 "cost_model_flops": ...}, ...],
     "dynamic": {"flops_counted", "cost_model_flops", "wall_s", ...},
     "static":  {"flops_counted", "wall_s"},            # the whole-slice path, full precision, every slice
     "ratios":  {"flops_counted": static / dynamic, "cost_model_flops": ..., "wall_s": ...},
     "note": ...}

``index`` counts slices of the training grid (the slice axis last); slices outside the
case's foreground box are ``outside`` (nothing runs). FLOPs are counted with
``torch.utils.flop_counter`` on what ran; ``cost_model_flops`` scales each quantized
unit's counted FLOPs (the residual U-Net's encoder stages; a backbone segmenter's whole
backbone) by ``bits / 32`` (the paper's cost model: it is not a
time). Wall times are measured on passes without FLOP counting (the FLOPs come from a second,
counted pass of the same decisions). ``dynamic_summary.json`` sums the cases.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medtune import distributed
from medtune.errors import ConfigError

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".dynamic.json"
SUMMARY_FILE = "dynamic_summary.json"
COST_MODEL_NOTE = (
    "flops_counted: torch.utils.flop_counter on the operations that ran (matmuls and convolutions; a "
    "multiply-add = 2). cost_model_flops: the same, each quantized unit (encoder stage, or backbone) scaled by bits/32 (the "
    "Med-DANet V2 cost model, not a measured time). wall_s: measured on a pass without FLOP counting."
)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    from medtune.data.cases import LAYOUTS
    from medtune.data.inputs import SUBSETS
    from medtune.finetune.dynamic.config import SLICE_FITS

    parser.add_argument("--layout", default=None, choices=LAYOUTS,
                        help="dataset layout of --input (default: the run's data.layout; auto detects it)")
    parser.add_argument("--subset", default="training", choices=SUBSETS,
                        help="for a dataset folder: its training cases (default) or the 'test' list of its dataset.json")
    parser.add_argument("--slice-fit", default=None, choices=SLICE_FITS,
                        help="slices of another size than the training slices: pad them up or resize them "
                        "(default: the run's model.slice_fit)")
    parser.add_argument("--no-static", action="store_true",
                        help="skip the static whole-slice run the report compares with (faster)")
    parser.add_argument("--slice-batch", type=int, default=64, help="slices per forward pass (default 64)")


def case_report(case_id: str, prediction, static, bbox, grid_depth: int, slice_fit: str) -> dict[str, Any]:
    """The per-case report (see the module docstring) of a :class:`VolumePrediction` (and
    its static twin or None); ``bbox`` is the foreground box on the training grid."""
    first = bbox[2][0]
    s = prediction.slices
    rows = []
    inside = {first + j: j for j in range(len(s.choices))}
    for z in range(grid_depth):
        j = inside.get(z)
        if j is None:
            rows.append({"index": z, "choice": "outside", "bits": None, "crop_origin": None, "flops": 0,
                         "decision_flops": 0, "path_flops": 0, "cost_model_flops": 0.0})
            continue
        rows.append({"index": z, "choice": s.choices[j], "bits": s.bits[j], "crop_origin": s.origins[j],
                     "flops": s.decision_flops[j] + s.path_flops[j], "decision_flops": s.decision_flops[j],
                     "path_flops": s.path_flops[j], "cost_model_flops": s.cost_model_flops[j] + s.decision_flops[j]})
    dynamic = prediction.totals()
    report = {"case": case_id, "slice_fit": slice_fit, "slice_size": [int(n) for n in prediction.probabilities.shape[1:3]],
              "fitted_size": list(prediction.fitted_size), "slices": rows, "dynamic": dynamic,
              "choices": {c: sum(1 for r in rows if r["choice"] == c) for c in sorted({r["choice"] for r in rows})},
              "note": COST_MODEL_NOTE}
    if static is not None:
        report["static"] = {"flops_counted": static.totals()["flops_counted"], "wall_s": static.wall_s}
        report["ratios"] = _ratios(report["static"], dynamic)
    return report


def _ratios(static: dict, dynamic: dict) -> dict[str, float | None]:
    def ratio(a: float, b: float) -> float | None:
        return float(a) / float(b) if b else None

    return {"flops_counted": ratio(static["flops_counted"], dynamic["flops_counted"]),
            "cost_model_flops": ratio(static["flops_counted"], dynamic["cost_model_flops"]),
            "wall_s": ratio(static["wall_s"], dynamic["wall_s"])}


def predict_case(model, image: np.ndarray, affine, *, slice_fit: str, static: bool = True, count: bool = True,
                 batch: int = 64):
    """Raw image ``(M, H, W, D)`` -> ``(full probabilities (K, *S') on the training grid, the
    case's grid, the dynamic :class:`VolumePrediction`, the static one or None, the box, the grid depth)``."""
    from medtune.finetune.dynamic.inference import predict_volume
    from medtune.finetune.segmentation.inference import paste_probabilities

    prepared = model.data_plan.prepare(image, affine)

    def run(is_static: bool):
        timed = predict_volume(model, prepared.image, slice_fit=slice_fit, static=is_static, batch=batch)
        if not count:
            return timed
        # the same (deterministic) decisions again, under the FLOP counter, whose overhead
        # would otherwise be part of the wall time
        counted = predict_volume(model, prepared.image, slice_fit=slice_fit, count=True, static=is_static, batch=batch)
        counted.wall_s = timed.wall_s
        return counted

    dynamic = run(False)
    twin = run(True) if static else None
    full = paste_probabilities(dynamic.probabilities.numpy(), prepared)
    return full, prepared.grid, dynamic, twin, prepared.bbox, prepared.shape[-1]


def predict_cases(model, cases, out_dir: Path, *, slice_fit: str, static: bool = True, batch: int = 64,
                  progress: bool = True) -> list[dict]:
    """Label maps and reports of ``cases`` into ``out_dir``; returns the reports."""
    from tqdm.auto import tqdm

    from medtune.checkpoints.io import save_json
    from medtune.data.volume import load_case
    from medtune.finetune.segmentation.inference import labels_on_input, nifti_output_name, write_label_map

    reports = []
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        volume = load_case(case, with_label=False)
        full, grid, dynamic, twin, bbox, depth = predict_case(model, volume.image, volume.affine,
                                                              slice_fit=slice_fit, static=static, batch=batch)
        labels = labels_on_input(full, grid, model.label_spec.values)
        write_label_map(labels, out_dir / nifti_output_name(case.case_id), volume.affine, volume.header)
        report = case_report(case.case_id, dynamic, twin, bbox, depth, slice_fit)
        save_json(report, out_dir / f"{case.case_id}{REPORT_SUFFIX}")
        reports.append(report)
    return reports


def summarize(reports: Sequence[dict]) -> dict[str, Any]:
    """Sums over cases of the reports' dynamic and static totals, and the ratios of the sums."""
    dynamic = {k: sum(r["dynamic"][k] for r in reports) for k in ("flops_counted", "cost_model_flops", "wall_s")}
    summary: dict[str, Any] = {"cases": len(reports), "dynamic": dynamic,
                               "gflops_per_volume": dynamic["flops_counted"] / 1e9 / max(len(reports), 1),
                               "note": COST_MODEL_NOTE}
    if reports and all("static" in r for r in reports):
        static = {k: sum(r["static"][k] for r in reports) for k in ("flops_counted", "wall_s")}
        summary["static"] = static
        summary["static_gflops_per_volume"] = static["flops_counted"] / 1e9 / len(reports)
        summary["ratios"] = _ratios(static, dynamic)
    return summary


def predict(loaded, args: argparse.Namespace) -> int:
    from medtune.checkpoints.io import refuse_existing, save_json
    from medtune.finetune.segmentation.predict import _check_channels, check_output, input_cases

    if not args.output:
        raise ConfigError("dynamic prediction needs --output DIR (a folder for the label maps and reports)")
    if args.slice_batch < 1:
        raise ConfigError(f"--slice-batch must be >= 1, got {args.slice_batch}")
    data = loaded.config.data
    layout = args.layout or data.layout
    cases = input_cases(Path(args.input), layout, data.modalities, getattr(args, "subset", "training"))
    out_dir = Path(args.output)
    part, parts = getattr(args, "part_id", 0), getattr(args, "num_parts", 1)
    mine = cases[part::parts]
    check_output(out_dir, Path(args.input), mine, args.overwrite, None)
    refuse_existing((out_dir / f"{c.case_id}{REPORT_SUFFIX}" for c in mine), args.overwrite, "report")
    _check_channels([loaded.model], mine, data.modalities)
    slice_fit = args.slice_fit or loaded.config.model.slice_fit
    reports = predict_cases(loaded.model, mine, out_dir, slice_fit=slice_fit, static=not args.no_static,
                            batch=args.slice_batch, progress=getattr(args, "show_progress", True))
    summary = summarize(reports)
    name = SUMMARY_FILE if parts == 1 else f"dynamic_summary.part{part}.json"
    if parts == 1 or not (out_dir / name).exists() or args.overwrite:
        save_json(summary, out_dir / name)
    line = f"wrote {len(reports)} label maps and reports of {loaded.folder} to {out_dir}: " \
           f"{summary['gflops_per_volume']:.3f} GFLOPs per volume counted"
    if "ratios" in summary:
        r = {k: "nothing ran" if v is None else f"{v:.2f}x" for k, v in summary["ratios"].items()}
        line += (f", static {summary['static_gflops_per_volume']:.3f} ({r['flops_counted']} counted, "
                 f"{r['cost_model_flops']} cost model, {r['wall_s']} wall time)")
    log.info(line)
    return 0


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate_dynamic(model, val_set, label_spec, cfg, processes: Any = None) -> dict[str, float]:
    """Dice per region of held-out volumes predicted slice by slice as ``predict`` does,
    the cost-model FLOPs relative to the static whole-slice path, and the share of each choice."""
    from medtune.finetune.segmentation.metrics import dice_scores
    from medtune.finetune.dynamic.inference import predict_volume

    count = len(val_set) if cfg.validation.max_cases is None else min(cfg.validation.max_cases, len(val_set))
    paths = list(model.paths) + ["empty"]

    def score(indices: list[int]):
        rows = []
        for index in indices:
            item = val_set[index]
            pred = predict_volume(model, item["image"], slice_fit=cfg.model.slice_fit)
            dice = dice_scores(label_spec.index_region_masks(pred.probabilities.argmax(0)),
                               label_spec.index_region_masks(item["label"])).tolist()
            _, _, static = model.cost_table(pred.fitted_size)
            relative = sum(pred.slices.cost_model_flops) / (static * len(pred.slices.choices))
            shares = [pred.slices.choices.count(p) / len(pred.slices.choices) for p in paths]
            rows.append((index, [*dice, relative, *shares]))
        return rows

    rows = distributed.split_gather(processes, count, score)
    means = torch.tensor([row[1] for row in rows], dtype=torch.float64).mean(0).tolist()
    regions = len(label_spec.region_names)
    metrics = {f"Dice_{name}": value for name, value in zip(label_spec.region_names, means[:regions])}
    metrics["Dice_mean"] = sum(means[:regions]) / regions
    metrics["relative_flops"] = means[regions]
    metrics.update({f"chose_{p}": v for p, v in zip(paths, means[regions + 1:])})
    return metrics


__all__ = ["add_predict_arguments", "case_report", "predict", "predict_case", "predict_cases", "summarize",
           "validate_dynamic"]
