"""``medtune predict --model RUN --input ... [--output OUT]``: use a trained run on new data.

The task is the one the run (or export) folder records in ``config.json``; the task's
own flags are added to the command (``medtune predict --model RUN --help`` lists them).
Every task loads the model the same way (``--checkpoint best|last``, ``--device``,
``--base-weights`` for an adapter export) and then predicts its own way; several
``--model`` runs make an ensemble where the task supports it (segmentation); no task
writes over a file that exists unless ``--overwrite`` is given:

- segmentation: NIfTI label maps of a case / dataset / ``imagesTs/`` folder;
- referring: a mask for ``--input IMAGE --expression TEXT``, or every record of a ``.jsonl``;
- vqa: the answer to ``--question`` for an image or folder, or a dataset's eval split.
"""

from __future__ import annotations

import argparse

from medtune.checkpoints.runs import CHECKPOINTS, DEFAULT_CHECKPOINT, read_run_config
from medtune.cli import peek
from medtune.errors import MedtuneError
from medtune.finetune.base import TASKS, get_task


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    parser.description = (
        f"{parser.description or ''}. Tasks: {', '.join(TASKS.names())}; a task's own flags are listed "
        "by `medtune predict --model RUN --help`."
    )
    parser.add_argument(
        "--model", required=True, nargs="+", metavar="RUN",
        help="a finetuning run folder or an export of one; several: an ensemble (segmentation: averaged probabilities)",
    )
    parser.add_argument(
        "--input", required=True,
        help="what to predict on; segmentation: a case folder, a dataset folder or an imagesTs/ folder; "
        "referring: an image (with --expression) or a .jsonl of records; vqa: an image or a folder of "
        "images (with --question), or a dataset folder",
    )
    parser.add_argument(
        "--output", default=None,
        help="where predictions go (segmentation: required folder; referring: folder or MASK.png; "
        "vqa: optional, a folder for answers.jsonl or the .jsonl itself)",
    )
    parser.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT, choices=CHECKPOINTS,
        help=f"which weights of a run: best evaluation or last step (default {DEFAULT_CHECKPOINT})",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--base-weights", default=None, help="base backbone file of an adapter export, if moved")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write over predictions that exist (without it an existing file is refused, before anything is written)",
    )
    model = peek(list(argv), "--model")
    try:
        task = get_task(read_run_config(model).task) if model else None
    except MedtuneError:  # an unreadable --model is reported by run()
        task = None
    if task is not None:
        task.add_predict_arguments(parser.add_argument_group(f"task '{task.name}'", task.description or None))


def run(args: argparse.Namespace) -> int:
    from medtune.errors import ConfigError
    from medtune.finetune.weights import load_trained

    models = args.model if isinstance(args.model, list) else [args.model]
    if len(models) > 1 and args.base_weights is not None:
        raise ConfigError("--base-weights applies to one adapter export; ensemble runs that record their base")
    loaded = [load_trained(m, args.checkpoint, base_weights=args.base_weights, device=args.device) for m in models]
    tasks = {run.task.name for run in loaded}
    if len(tasks) > 1:
        raise ConfigError(f"--model runs of different tasks ({', '.join(sorted(tasks))}) cannot make one prediction")
    if len(loaded) > 1:
        return int(loaded[0].task.predict_ensemble(loaded, args) or 0)
    return int(loaded[0].task.predict(loaded[0], args) or 0)
