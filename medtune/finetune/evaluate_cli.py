"""``medtune evaluate --pred PREDICTIONS --gt GROUND_TRUTH [--task T]``: score predictions.

Scores what ``medtune predict`` wrote against ground truth, the task's way (default
``segmentation``: Dice/HD95 per region of NIfTI label maps, a per-case CSV and
``summary.json`` in the predictions folder). ``medtune evaluate --task T --help`` lists
the task's own flags.
"""

from __future__ import annotations

import argparse

from medtune.cli import peek
from medtune.finetune.base import TASKS, get_task

DEFAULT_TASK = "segmentation"


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    parser.add_argument("--pred", required=True, help="the predictions (segmentation: a folder of <case>.nii.gz)")
    parser.add_argument("--gt", required=True, help="the ground truth (segmentation: a labeled dataset folder)")
    parser.add_argument("--task", default=DEFAULT_TASK, choices=TASKS.names(),
                        help=f"the task whose predictions these are (default {DEFAULT_TASK})")
    task = get_task(peek(list(argv), "--task") or DEFAULT_TASK)
    task.add_evaluate_arguments(parser.add_argument_group(f"task '{task.name}'", task.description or None))


def run(args: argparse.Namespace) -> int:
    return int(get_task(args.task).score(args) or 0)
