"""``medtune evaluate --pred OUT --gt DIR`` for segmentation: Dice/HD95 of predicted label maps.

Reads ``OUT/<case>.nii.gz`` for every labeled case of ``DIR`` (any layout
:func:`medtune.data.find_cases` knows; only the label files are needed) and scores
each region with :func:`medtune.finetune.segmentation.metrics.evaluate_case` using the
ground truth's voxel spacing:

- BraTS data (BraTS folders, BraTS values): the regions WT/TC/ET and BraTS's official
  rules for empty regions;
- any other dataset: the labels (or nnU-Net v2 regions) of its ``dataset.json``, one row
  per label named there, and nnU-Net's rules: a score with an empty side is NaN, left
  out of the means, and the NaNs are counted.

Writes a per-case CSV (``scores.csv``) and ``summary.json`` in nnU-Net's shape
(``metric_per_case``, ``mean`` per region, ``foreground_mean`` over regions) beside the
predictions, and prints the means.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import DataError

log = logging.getLogger(__name__)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from medtune.data.cases import LAYOUTS

    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout of --gt (default auto)")
    parser.add_argument("--csv", default=None, help="per-case CSV (default: <pred>/scores.csv)")
    parser.add_argument(
        "--labels",
        default=None,
        help="label values in class order, e.g. 0,1,2,3 (default: dataset.json of --gt, else BraTS); named "
        "from dataset.json, BraTS regions only for BraTS data",
    )
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")


def scoring_label_spec(gt_root: Path, labels: str | None, layout: str = "auto"):
    """The :class:`LabelSpec` to score with: ``--labels`` (named from ``dataset.json``;
    BraTS regions only for BraTS data), else the dataset's default (``dataset.json``
    labels for MSD/nnU-Net, BraTS 0/1/2/4 otherwise)."""
    from medtune.data.cases import detect_layout
    from medtune.data.check import default_label_spec
    from medtune.data.labels import LabelSpec

    gt_root = Path(gt_root)
    if not labels:
        return default_label_spec(gt_root, layout)
    brats = (detect_layout(gt_root) if layout == "auto" else layout) == "brats"
    names = None
    if (gt_root / "dataset.json").is_file():
        try:
            described = LabelSpec.from_dataset_json(gt_root / "dataset.json")
            names = dict(zip(described.values, described.names or ()))
        except DataError:
            names = None
    try:
        return LabelSpec.from_values([int(v) for v in labels.split(",")], brats=brats, names=names)
    except ValueError as exc:
        raise DataError(f"--labels '{labels}': {exc}") from None


def find_prediction(pred_dir: Path, case_id: str) -> Path:
    for suffix in (".nii.gz", ".nii"):
        path = pred_dir / f"{case_id}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"case {case_id}: no prediction {pred_dir / (case_id + '.nii.gz')}")


def evaluate_folder(
    pred_dir: str | Path,
    gt_root: str | Path,
    *,
    layout: str = "auto",
    labels: str | None = None,
    with_hd95: bool = True,
    progress: bool = False,
) -> list[dict]:
    """Score every labeled case of ``gt_root`` against ``pred_dir/<case>.nii.gz``.

    Returns one dict per case: ``{"case": id, "Dice_ET": .., "HD95_ET": .., ...}``.
    Raises :class:`DataError` naming the file for a missing prediction, a prediction of
    another shape or voxel grid, or label values outside the dataset's declared labels.
    """
    return score_folder(pred_dir, gt_root, layout=layout, labels=labels, with_hd95=with_hd95, progress=progress)[0]


def score_folder(pred_dir, gt_root, *, layout="auto", labels=None, with_hd95=True, progress=False):
    """:func:`evaluate_folder`'s rows, the label spec and the rules (``brats``/``nnunet``)
    and the file pairs ``[(case, prediction, reference)]``."""
    from tqdm.auto import tqdm

    from medtune.data.geometry import voxel_spacing
    from medtune.data.inputs import label_files
    from medtune.data.volume import AFFINE_TOLERANCE, read_label
    from medtune.finetune.segmentation.metrics import evaluate_case

    pred_dir, gt_root = Path(pred_dir), Path(gt_root)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder not found: {pred_dir}")
    spec = scoring_label_spec(gt_root, labels, layout)
    rules = "brats" if spec.is_brats else "nnunet"
    references = label_files(gt_root, layout)
    pairs = [(case_id, find_prediction(pred_dir, case_id), label) for case_id, label in references]
    rows = []
    for case_id, pred_path, label_path in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        true, true_img = read_label(label_path, case_id)
        pred, pred_img = read_label(pred_path, case_id)
        if pred.shape != true.shape:
            raise DataError(f"{pred_path}: shape {pred.shape} differs from the label's {true.shape} ({label_path})")
        if not np.allclose(pred_img.affine, true_img.affine, atol=AFFINE_TOLERANCE):
            raise DataError(f"{pred_path}: another voxel grid (affine) than the label {label_path}")
        spec.check(pred, where=str(pred_path))
        spec.check(true, where=str(label_path))
        spacing = voxel_spacing(true_img.affine)
        scores = evaluate_case(pred, true, spec.regions, spacing, with_hd95=with_hd95, rules=rules)
        rows.append({"case": case_id, **scores, **_case_means(scores)})
    return rows, spec, rules, pairs


def _case_means(scores: dict[str, float]) -> dict[str, float]:
    """The case's mean over regions of each metric (NaN regions left out)."""
    out = {}
    for metric in ("Dice", "HD95"):
        values = [v for k, v in scores.items() if k.startswith(f"{metric}_") and not math.isnan(v)]
        if any(k.startswith(f"{metric}_") for k in scores):
            out[f"{metric}_mean"] = float(np.mean(values)) if values else float("nan")
    return out


def write_scores_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) if rows else ["case"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def summary_of(rows: list[dict], spec, rules: str, pairs) -> dict[str, Any]:
    """nnU-Net's ``summary.json`` shape: ``metric_per_case`` (each case's metrics per
    region, with its files), ``mean`` (per region, NaN cases left out), ``foreground_mean``
    (the mean over regions); plus the rules, the regions and the NaN counts. NaN is
    written as null."""
    from medtune.finetune.segmentation.metrics import mean_scores, nan_counts

    regions = list(spec.regions)
    metrics = [m for m in ("Dice", "HD95") if rows and f"{m}_{regions[0]}" in rows[0]]
    scored = [{k: v for k, v in row.items() if k != "case"} for row in rows]
    means, nans = mean_scores(scored), nan_counts(scored)
    files = {case: (str(pred), str(ref)) for case, pred, ref in pairs}
    return {
        "task": "segmentation",
        "rules": rules,
        "regions": {name: list(values) for name, values in spec.regions.items()},
        "metric_per_case": [
            {
                "case": row["case"], "prediction_file": files[row["case"]][0], "reference_file": files[row["case"]][1],
                "metrics": {r: {m: _json_number(row[f"{m}_{r}"]) for m in metrics} for r in regions},
            }
            for row in rows
        ],
        "mean": {r: {m: _json_number(means[f"{m}_{r}"]) for m in metrics} for r in regions},
        "foreground_mean": {
            m: _json_number(float(np.nanmean([means[f"{m}_{r}"] for r in regions]))
                            if any(not math.isnan(means[f"{m}_{r}"]) for r in regions) else float("nan"))
            for m in metrics
        },
        "nan_counts": {r: {m: nans[f"{m}_{r}"] for m in metrics} for r in regions},
        "cases": len(rows),
    }


def score(args: argparse.Namespace) -> int:
    rows, spec, rules, pairs = score_folder(
        args.pred, args.gt, layout=args.layout, labels=args.labels, with_hd95=not args.no_hd95, progress=True
    )
    from medtune.checkpoints.runs import SUMMARY_FILE, write_summary

    csv_path = write_scores_csv(rows, args.csv or Path(args.pred) / "scores.csv")
    summary = summary_of(rows, spec, rules, pairs)
    write_summary(args.pred, summary)
    out = sys.stdout
    out.write(f"{len(rows)} cases ({rules} rules); per-case scores: {csv_path}, summary: "
              f"{Path(args.pred) / SUMMARY_FILE}\n")
    for metric, label, fmt in (("Dice", "mean Dice", "{:.4f}"), ("HD95", "mean HD95 (mm)", "{:.2f}")):
        if metric not in summary["foreground_mean"]:
            continue
        parts = [f"{r} " + ("nan" if v[metric] is None else fmt.format(v[metric])) for r, v in summary["mean"].items()]
        overall = summary["foreground_mean"][metric]
        parts.append("mean " + ("nan" if overall is None else fmt.format(overall)))
        out.write(f"{label}: {'  '.join(parts)}\n")
    for region, counts in summary["nan_counts"].items():
        for metric, count in counts.items():
            if count:
                out.write(f"{metric} of {region}: undefined in {count} of {len(rows)} cases (an empty region), "
                          "left out of the mean\n")
    return 0
