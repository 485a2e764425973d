"""``medtune predict --model RUN --input CASE_OR_FOLDER --output OUT``.

Dispatches on the run's task (``config.json``/``adapter_config.json`` ``task``):
segmentation is handled here; ``referring``/``vqa`` runs go to
``medtune.finetune.referring`` / ``medtune.finetune.vqa`` ``predict_main(args)``.

Segmentation writes ``OUT/<case>.nii.gz`` per case: the input's affine and header,
labels in the dataset's values (BraTS 0/1/2/4), whole-volume sliding-window inference
(MONAI) on the z-scored, foreground-cropped volume pasted back into the input's shape.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from medtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASK_MODULES = {"referring": "medtune.finetune.referring", "vqa": "medtune.finetune.vqa"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="finetune run folder or export (full, adapter, merged)")
    parser.add_argument(
        "--input", required=True,
        help="segmentation: one case folder, a dataset folder, or an images folder of an MSD/nnU-Net "
        "dataset (imagesTs/: channel names from the dataset.json beside it); referring: an image (with --expression) "
        "or a .jsonl of records; vqa: an image or a folder of images (with --question), or a dataset "
        "folder (without: answers and scores its eval split)",
    )
    parser.add_argument(
        "--output", default=None,
        help="folder for the predictions (required for segmentation; referring: a folder or MASK.png, "
        "default ./prediction; vqa: optional, answers are printed and also written to OUT/answers.jsonl)",
    )
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--tta", action="store_true", help="average over flips of every subset of the spatial axes")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which weights of a run folder: best validation (default) or last step")
    parser.add_argument("--base-weights", default=None, help="base backbone file for an adapter export")
    parser.add_argument(
        "--layout", default="auto", choices=("auto", "brats", "msd", "nnunet"),
        help="dataset layout of --input (default auto)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--expression", default=None, help="referring: the expression for one input image")
    parser.add_argument("--question", default=None, help="vqa: the question for one input image")
    parser.add_argument("--threshold", type=float, default=None, help="referring: mask probability threshold (0.5)")


def run_task(model_dir: Path) -> str:
    """The task recorded in a run/export folder (default segmentation)."""
    from medtune.checkpoints.io import load_json

    for name in ("config.json", "adapter_config.json"):
        path = model_dir / name
        if path.is_file():
            data = load_json(path)
            if isinstance(data, dict):
                return str(data.get("task") or "segmentation")
    return "segmentation"


def input_cases(path: Path, layout: str, modalities):
    """Cases of a dataset folder, an MSD/nnU-Net ``imagesTs/``-style folder, or one case folder."""
    from medtune.data.cases import (
        detect_layout,
        find_channel_file_cases,
        find_cases,
        find_msd_image_cases,
        is_channel_file_folder,
        is_nifti,
        scan_cases,
    )

    if path.is_file():
        raise DataError(f"--input {path} is a file: give its case folder (or a dataset folder)")
    if not path.is_dir():
        raise DataError(f"input folder not found: {path}")
    if is_channel_file_folder(path):  # nnU-Net imagesTs/: <case>_0000.nii.gz, ...
        return find_channel_file_cases(path, modalities)
    if (path.parent / "dataset.json").is_file() and detect_layout(path.parent) == "msd":
        return find_msd_image_cases(path, modalities)  # MSD imagesTs/: one 4D file per case
    if any(p.is_file() and is_nifti(p) for p in path.iterdir()) and not (path / "dataset.json").is_file():
        cases, problems = scan_cases(path.parent, "brats", modalities)
        chosen = [c for c in cases if c.case_id == path.name]
        if not chosen:
            mine = [p for p in problems if f"case {path.name}:" in p]
            raise DataError(mine[0] if mine else f"{path}: not a readable BraTS case folder")
        return chosen
    return find_cases(path, layout, modalities)


def predict_segmentation(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from medtune.checkpoints.export import load_segmenter
    from medtune.data.volume import load_case
    from medtune.finetune.inference import nifti_output_name, write_label_map

    if not args.output:
        raise ConfigError("segmentation prediction needs --output DIR (a folder for the <case>.nii.gz label maps)")
    if not 0.0 <= args.overlap < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_segmenter(args.model, which=args.checkpoint, base_weights=args.base_weights, map_location=device)
    data_cfg = model.run_config.get("data", {})
    cases = input_cases(Path(args.input), args.layout, data_cfg.get("modalities"))
    out_dir = Path(args.output)
    for case in tqdm(cases, desc="predict", unit="case"):
        volume = load_case(case, with_label=False)
        if volume.image.shape[0] != model.backbone.in_chans:
            raise DataError(
                f"case {case.case_id}: {volume.image.shape[0]} modalities, the model takes {model.backbone.in_chans}"
            )
        labels = model.predict_volume(volume.image, overlap=args.overlap, tta=args.tta, sw_batch_size=args.sw_batch_size)
        write_label_map(labels, out_dir / nifti_output_name(case.case_id), volume.affine, volume.header)
    log.info("wrote %d label maps to %s", len(cases), out_dir)
    return 0


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such run folder")
    task = run_task(model_dir)
    if task == "segmentation":
        return predict_segmentation(args)
    if task not in TASK_MODULES:
        raise ConfigError(f"{model_dir}: unknown task '{task}'")
    try:
        module = importlib.import_module(TASK_MODULES[task])
    except ModuleNotFoundError as exc:
        raise ConfigError(f"task '{task}' is not available in this install ({exc})") from None
    return int(module.predict_main(args, model_dir) or 0)
