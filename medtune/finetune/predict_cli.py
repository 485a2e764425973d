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
    parser.add_argument(
        "--num-parts", type=int, default=None, metavar="N",
        help="split the inputs into N parts and predict part --part-id only, as nnU-Net (one command per GPU or "
        "machine); under `accelerate launch` each process takes one part by default (segmentation)",
    )
    parser.add_argument("--part-id", type=int, default=None, metavar="I", help="which part of --num-parts: 0..N-1")
    model = peek(list(argv), "--model")
    try:
        task = get_task(read_run_config(model).task) if model else None
    except MedtuneError:  # an unreadable --model is reported by run()
        task = None
    if task is not None:
        task.add_predict_arguments(parser.add_argument_group(f"task '{task.name}'", task.description or None))


def set_part(args: argparse.Namespace) -> None:
    """``args.part_id`` of ``args.num_parts``: the flags, else this process of a launch
    (each on its own device: ``cuda:LOCAL_RANK`` where there are GPUs), else 0 of 1;
    ``args.show_progress`` on the first part only under a launcher."""
    from medtune import distributed
    from medtune.errors import ConfigError

    args.show_progress = True
    if args.num_parts is not None or args.part_id is not None:
        if args.num_parts is None or args.part_id is None:
            raise ConfigError("--num-parts and --part-id go together (e.g. --num-parts 4 --part-id 0 ... 3)")
        if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
            raise ConfigError(f"--part-id must be in 0..{args.num_parts - 1} of --num-parts {args.num_parts}, "
                              f"got {args.part_id}")
        return
    state = distributed.launched_processes()
    args.part_id, args.num_parts = distributed.rank_and_world(state)
    if state is not None:
        args.show_progress = state.is_main_process
        if args.device is None:
            args.device = str(state.device)


def run(args: argparse.Namespace) -> int:
    from medtune.errors import ConfigError
    from medtune.finetune.weights import load_trained

    models = args.model if isinstance(args.model, list) else [args.model]
    if len(models) > 1 and args.base_weights is not None:
        raise ConfigError("--base-weights applies to one adapter export; ensemble runs that record their base")
    set_part(args)
    loaded = [load_trained(m, args.checkpoint, base_weights=args.base_weights, device=args.device) for m in models]
    tasks = {run.task.name for run in loaded}
    if len(tasks) > 1:
        raise ConfigError(f"--model runs of different tasks ({', '.join(sorted(tasks))}) cannot make one prediction")
    if args.num_parts > 1 and not loaded[0].task.predicts_in_parts:
        raise ConfigError(
            f"task '{loaded[0].task.name}' predicts in one process: --num-parts and multi-process launches "
            f"split {', '.join(name for name in TASKS.names() if get_task(name).predicts_in_parts)} predictions"
        )
    if len(loaded) > 1:
        return int(loaded[0].task.predict_ensemble(loaded, args) or 0)
    return int(loaded[0].task.predict(loaded[0], args) or 0)
