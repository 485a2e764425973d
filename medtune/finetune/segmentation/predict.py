"""``medtune predict`` for segmentation runs: NIfTI label maps of new cases.

Writes ``OUT/<case>.nii.gz`` per case: the input's affine and header, labels in the
dataset's values (BraTS 0/1/2/4), whole-volume sliding-window inference (MONAI) on the
z-scored, foreground-cropped volume pasted back into the input's shape.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from medtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--tta", action="store_true", help="average over flips of every subset of the spatial axes")
    parser.add_argument(
        "--layout", default="auto", choices=("auto", "brats", "msd", "nnunet"),
        help="dataset layout of --input (default auto)",
    )


def input_cases(path: Path, layout: str, modalities):
    """Cases of a dataset folder, an MSD/nnU-Net ``imagesTs/``-style folder, or one case folder."""
    from medtune.data.cases import (
        detect_layout,
        find_channel_file_cases,
        find_cases,
        find_image_file_cases,
        find_msd_image_cases,
        is_channel_file_folder,
        is_nifti,
        nifti_stem,
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
    images = [p for p in path.iterdir() if p.is_file() and is_nifti(p)]
    if images and not (path / "dataset.json").is_file():
        if not all(nifti_stem(p).startswith(f"{path.name}_") for p in images):
            return find_image_file_cases(path)  # a plain folder of images, one case per file
        cases, problems = scan_cases(path.parent, "brats", modalities)
        chosen = [c for c in cases if c.case_id == path.name]
        if not chosen:
            mine = [p for p in problems if f"case {path.name}:" in p]
            raise DataError(mine[0] if mine else f"{path}: not a readable BraTS case folder")
        return chosen
    return find_cases(path, layout, modalities)


def predict_cases(model, cases, out_dir: Path, *, overlap: float, tta: bool, sw_batch_size: int,
                  modalities=None) -> int:
    """Write one label map per case into ``out_dir`` with a progress bar; returns the count."""
    from tqdm.auto import tqdm

    from medtune.data.volume import load_case
    from medtune.finetune.segmentation.inference import nifti_output_name, write_label_map

    expected = model.in_chans
    trained_on = f" ({', '.join(modalities)})" if modalities else ""
    for case in cases:  # the channel count is known from the file listing: refuse before predicting
        if case.num_modalities != expected:
            raise DataError(
                f"case {case.case_id}: {case.num_modalities} channel(s) in {', '.join(str(f) for f in case.images)}; "
                f"the model was trained on {expected}{trained_on}"
            )
    for case in tqdm(cases, desc="predict", unit="case"):
        volume = load_case(case, with_label=False)
        labels = model.predict_volume(volume.image, overlap=overlap, tta=tta, sw_batch_size=sw_batch_size)
        write_label_map(labels, out_dir / nifti_output_name(case.case_id), volume.affine, volume.header)
    return len(cases)


def label_folders(input_path: Path, cases) -> set[Path]:
    """Folders that hold ground truth of the input dataset: the label files' folders and
    ``labels*/`` beside an ``images*/`` input or inside a dataset folder."""
    folders = {Path(case.label).parent for case in cases if case.label is not None}
    for root in (input_path, input_path.parent):
        folders |= {d for d in root.glob("labels*") if d.is_dir()}
    return {Path(os.path.abspath(f)) for f in folders}


def check_output(out_dir: Path, input_path: Path, cases, overwrite: bool) -> None:
    """Refuse, before predicting: an --output that is a file or lies in a ground-truth
    folder of the input, and label maps that exist (unless ``overwrite``)."""
    from medtune.checkpoints.io import refuse_existing
    from medtune.finetune.segmentation.inference import nifti_output_name

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output {out_dir} is a file; give a folder for the <case>.nii.gz label maps")
    target = Path(os.path.abspath(out_dir))
    for folder in label_folders(input_path, cases):
        if target == folder or folder in target.parents:
            raise ConfigError(f"--output {out_dir} is a ground-truth folder of the input ({folder}); choose another")
    refuse_existing((out_dir / nifti_output_name(c.case_id) for c in cases), overwrite, "label map")


def predict(loaded, args: argparse.Namespace) -> int:
    if not args.output:
        raise ConfigError("segmentation prediction needs --output DIR (a folder for the <case>.nii.gz label maps)")
    if not 0.0 <= args.overlap < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    model = loaded.model
    cases = input_cases(Path(args.input), args.layout, loaded.config.data.modalities)
    out_dir = Path(args.output)
    check_output(out_dir, Path(args.input), cases, args.overwrite)
    count = predict_cases(model, cases, out_dir, overlap=args.overlap, tta=args.tta, sw_batch_size=args.sw_batch_size,
                          modalities=loaded.config.data.modalities)
    log.info("wrote %d label maps to %s", count, out_dir)
    return 0
