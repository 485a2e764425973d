"""``medtune evaluate --pred OUT --gt DIR`` for segmentation: Dice/HD95 of predicted label maps.

Reads ``OUT/<case>.nii.gz`` for every labeled case of ``DIR`` (any layout
:func:`medtune.data.find_cases` knows), scores each region (BraTS: ET, TC, WT) with
:func:`medtune.finetune.metrics.evaluate_case` using the ground truth's voxel spacing,
writes a per-case CSV and prints the means.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np

from medtune.errors import DataError

log = logging.getLogger(__name__)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout", default="auto", choices=("auto", "brats", "msd", "nnunet"),
        help="dataset layout of --gt (default auto)",
    )
    parser.add_argument("--csv", default=None, help="per-case CSV (default: <pred>/scores.csv)")
    parser.add_argument(
        "--labels",
        default=None,
        help="label values in class order, e.g. 0,1,2,4 (default: dataset.json of --gt, else BraTS)",
    )
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")


def scoring_label_spec(gt_root: Path, labels: str | None, layout: str = "auto"):
    """The :class:`LabelSpec` to score with: ``--labels``, else the dataset's default
    (``dataset.json`` labels for MSD/nnU-Net, BraTS 0/1/2/4 otherwise)."""
    from medtune.data.check import default_label_spec
    from medtune.data.labels import LabelSpec

    if labels:
        try:
            return LabelSpec.from_values([int(v) for v in labels.split(",")])
        except ValueError as exc:
            raise DataError(f"--labels '{labels}': {exc}") from None
    return default_label_spec(gt_root, layout)


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
    Raises :class:`DataError` naming the file for a missing prediction, a shape
    mismatch, or label values outside the dataset's declared labels.
    """
    from tqdm.auto import tqdm

    from medtune.data.cases import find_cases
    from medtune.data.volume import read_label
    from medtune.finetune.segmentation.metrics import evaluate_case

    pred_dir, gt_root = Path(pred_dir), Path(gt_root)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder not found: {pred_dir}")
    spec = scoring_label_spec(gt_root, labels, layout)
    cases = find_cases(gt_root, layout, require_labels=True)
    rows = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        true, true_img = read_label(case.label, case.case_id)
        pred_path = find_prediction(pred_dir, case.case_id)
        pred, _ = read_label(pred_path, case.case_id)
        if pred.shape != true.shape:
            raise DataError(f"{pred_path}: shape {pred.shape} differs from the label's {true.shape} ({case.label})")
        spec.check(pred, where=str(pred_path))
        spec.check(true, where=str(case.label))
        spacing = tuple(float(z) for z in true_img.header.get_zooms()[: true.ndim])
        scores = evaluate_case(pred, true, spec.regions, spacing, with_hd95=with_hd95)
        rows.append({"case": case.case_id, **scores})
    return rows


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


def score(args: argparse.Namespace) -> int:
    rows = evaluate_folder(
        args.pred, args.gt, layout=args.layout, labels=args.labels, with_hd95=not args.no_hd95, progress=True
    )
    from medtune.checkpoints.runs import SUMMARY_FILE, write_summary

    csv_path = write_scores_csv(rows, args.csv or Path(args.pred) / "scores.csv")
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"}
    write_summary(args.pred, {"task": "segmentation", "mean": means, "per_case": rows})
    dice = "  ".join(f"{k[5:]} {v:.4f}" for k, v in means.items() if k.startswith("Dice_"))
    hd95 = "  ".join(f"{k[5:]} {v:.2f}" for k, v in means.items() if k.startswith("HD95_"))
    sys.stdout.write(f"{len(rows)} cases; per-case scores: {csv_path}, summary: {Path(args.pred) / SUMMARY_FILE}\n")
    sys.stdout.write(f"mean Dice: {dice}\n")
    if hd95:
        sys.stdout.write(f"mean HD95 (mm): {hd95}\n")
    return 0
