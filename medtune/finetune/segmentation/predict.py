"""``medtune predict`` for segmentation runs: NIfTI label maps (and probabilities) of new cases.

Writes ``OUT/<case>.nii.gz`` per case, with the input's shape, affine and header, labels
in the dataset's values (BraTS 0/1/2/4). Each case goes the way the run's training data
went (its ``DataPlan``: reoriented, resampled to the run's spacing, cropped to the
foreground, normalised with the run's statistics), is predicted by sliding window
(MONAI, overlap 0.5 as nnU-Net), and mapped back to the input's own grid.

``--num-parts N --part-id I`` predicts every N-th case from the I-th (as nnU-Net), and
``accelerate launch -m medtune predict ...`` gives each process one part: every case is
written exactly once, as one process would write it.

``--model RUN1 RUN2 ...`` ensembles runs: each run's probabilities are mapped back to the
input grid (linear), averaged, and the argmax is written. ``--save-probabilities`` also
writes the per-class probabilities on the input grid (``<case>.npz`` float16, as nnU-Net,
or a 4D NIfTI).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    from medtune.data.cases import LAYOUTS
    from medtune.data.inputs import SUBSETS

    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap in [0, 1) (default 0.5, as nnU-Net)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--tta", action="store_true", help="average over flips of every subset of the spatial axes")
    parser.add_argument(
        "--layout", default=None, choices=LAYOUTS,
        help="dataset layout of --input (default: the run's data.layout; auto detects it)",
    )
    parser.add_argument(
        "--subset", default="training", choices=SUBSETS,
        help="for a dataset folder: its training cases (default) or the 'test' list of its dataset.json",
    )
    parser.add_argument(
        "--save-probabilities", action="store_true",
        help="also write per-class probabilities on the input grid (see --probabilities-format)",
    )
    parser.add_argument(
        "--probabilities-format", default="npz", choices=("npz", "nifti"),
        help="<case>.npz with float16 'probabilities' (K, H, W, D) as nnU-Net (default), "
        "or <case>_probabilities.nii.gz (H, W, D, K)",
    )


def input_cases(path: Path, layout: str, modalities, subset: str = "training"):
    """Cases of a dataset folder, one case folder, an MSD/nnU-Net ``imagesTs/``-style
    folder, a plain folder of images, or a dataset's ``test`` list
    (:func:`medtune.data.inputs.input_cases`)."""
    from medtune.data.inputs import input_cases as find_input_cases

    return find_input_cases(path, layout, modalities, subset)


def _check_channels(models, cases, modalities) -> None:
    """The channel count is known from the file listing: refuse before predicting."""
    trained_on = f" ({', '.join(modalities)})" if modalities else ""
    for model in models:
        expected = model.in_chans
        for case in cases:
            if case.num_modalities != expected:
                raise DataError(
                    f"case {case.case_id}: {case.num_modalities} channel(s) in "
                    f"{', '.join(str(f) for f in case.images)}; the model was trained on {expected}{trained_on}"
                )


def predict_cases(models, cases, out_dir: Path, *, overlap: float, tta: bool, sw_batch_size: int,
                  modalities=None, probabilities: str | None = None, progress: bool = True) -> int:
    """Write one label map per case into ``out_dir`` (and, with ``probabilities`` = ``npz``
    or ``nifti``, its class probabilities) with a progress bar; returns the count.
    ``models``: one segmenter, or several to ensemble (the same label values)."""
    from tqdm.auto import tqdm

    from medtune.data.volume import load_case
    from medtune.finetune.segmentation.inference import (
        labels_on_input,
        nifti_output_name,
        predict_probabilities,
        probabilities_on_input,
        probabilities_output_name,
        write_label_map,
        write_probabilities,
    )

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    _check_channels(models, cases, modalities)
    values = models[0].label_spec.values
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        volume = load_case(case, with_label=False)
        on_input = None  # (K, H, W, D): the ensemble's mean, or the one model's when asked for
        for model in models:
            full, grid = predict_probabilities(
                model, volume.image, volume.affine, model.data_plan, model.roi_size,
                overlap=overlap, sw_batch_size=sw_batch_size, tta=tta,
            )
            if len(models) == 1:
                labels = labels_on_input(full, grid, values)  # argmax on the model's grid, nearest back
                if probabilities is not None:
                    on_input = probabilities_on_input(full, grid)
            else:
                mapped = probabilities_on_input(full, grid)
                on_input = mapped if on_input is None else on_input + mapped
        if len(models) > 1:
            on_input /= len(models)
            labels = np.asarray(values, dtype=np.uint8)[np.argmax(on_input, axis=0)]
        write_label_map(labels, out_dir / nifti_output_name(case.case_id), volume.affine, volume.header)
        if probabilities is not None:
            write_probabilities(on_input, out_dir / probabilities_output_name(case.case_id, probabilities), values,
                                volume.affine, volume.header)
    return len(cases)


def label_folders(input_path: Path, cases) -> set[Path]:
    """Folders that hold ground truth of the input dataset: the label files' folders and
    ``labels*/`` beside an ``images*/`` input or inside a dataset folder."""
    folders = {Path(case.label).parent for case in cases if case.label is not None}
    for root in (input_path, input_path.parent):
        folders |= {d for d in root.glob("labels*") if d.is_dir()}
    return {Path(os.path.abspath(f)) for f in folders}


def check_output(out_dir: Path, input_path: Path, cases, overwrite: bool, probabilities: str | None = None) -> None:
    """Refuse, before predicting: an --output that is a file or lies in a ground-truth
    folder of the input, and label maps (or probability files) that exist (unless ``overwrite``)."""
    from medtune.checkpoints.io import refuse_existing
    from medtune.finetune.segmentation.inference import nifti_output_name, probabilities_output_name

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output {out_dir} is a file; give a folder for the <case>.nii.gz label maps")
    target = Path(os.path.abspath(out_dir))
    for folder in label_folders(input_path, cases):
        if target == folder or folder in target.parents:
            raise ConfigError(f"--output {out_dir} is a ground-truth folder of the input ({folder}); choose another")
    refuse_existing((out_dir / nifti_output_name(c.case_id) for c in cases), overwrite, "label map")
    if probabilities is not None:
        names = (out_dir / probabilities_output_name(c.case_id, probabilities) for c in cases)
        refuse_existing(names, overwrite, "probability file")


def _agree(loaded: Sequence) -> None:
    """Runs of one ensemble must predict the same classes from the same channels."""
    first = loaded[0]
    for other in loaded[1:]:
        if tuple(other.model.label_spec.values) != tuple(first.model.label_spec.values):
            raise ConfigError(
                f"--model {other.folder} predicts labels {list(other.model.label_spec.values)}, "
                f"{first.folder} {list(first.model.label_spec.values)}: runs of an ensemble share their labels"
            )
        if other.config.data.modalities != first.config.data.modalities:
            raise ConfigError(
                f"--model {other.folder} reads modalities {other.config.data.modalities}, {first.folder} "
                f"{first.config.data.modalities}: runs of an ensemble read the same channels"
            )


def predict(loaded, args: argparse.Namespace) -> int:
    return predict_ensemble([loaded], args)


def predict_ensemble(loaded: Sequence, args: argparse.Namespace) -> int:
    if not args.output:
        raise ConfigError("segmentation prediction needs --output DIR (a folder for the <case>.nii.gz label maps)")
    if not 0.0 <= args.overlap < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    _agree(loaded)
    data = loaded[0].config.data
    layout = args.layout or data.layout
    cases = input_cases(Path(args.input), layout, data.modalities, getattr(args, "subset", "training"))
    out_dir = Path(args.output)
    probabilities = args.probabilities_format if getattr(args, "save_probabilities", False) else None
    part, parts = getattr(args, "part_id", 0), getattr(args, "num_parts", 1)
    mine = cases[part::parts]  # as nnU-Net's --part_id/--num_parts: each case in exactly one part
    check_output(out_dir, Path(args.input), mine, args.overwrite, probabilities)  # other parts' files are theirs
    count = predict_cases([run.model for run in loaded], mine, out_dir, overlap=args.overlap, tta=args.tta,
                          sw_batch_size=args.sw_batch_size, modalities=data.modalities, probabilities=probabilities,
                          progress=getattr(args, "show_progress", True))
    what = f"an ensemble of {len(loaded)} runs" if len(loaded) > 1 else str(loaded[0].folder)
    share = f" (part {part} of 0..{parts - 1}: {count} of {len(cases)} cases)" if parts > 1 else ""
    log.info("wrote %d label maps of %s to %s%s", count, what, out_dir, share)
    return 0
