"""``medtune finetune``: finetune on labeled data, for any registered task.

The task comes from ``--task`` or the config's top-level ``task:`` key (default
``segmentation``); its own flags are added to the command (``medtune finetune --task vqa
--help`` lists them)::

    accelerate launch -m medtune finetune --config configs/medtuning_vit_b16_brats.yaml \\
        --data data/BraTS2020 --backbone checkpoints/fremae-run --output checkpoints/medtuning

Flags are shorthands for config values and are applied before ``--set``, so an explicit
``--set`` of the same key wins (``--data A --set data.root=B`` trains on B).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medtune.cli import add_run_arguments, fetch_downloads, peek
from medtune.errors import ConfigError
from medtune.finetune.base import TASKS, Task, get_task

DEFAULT_TASK = "segmentation"


def task_name_of(task_flag: str | None, raw: dict) -> str:
    """``--task``, else the config's ``task:``, else segmentation."""
    name = task_flag or raw.get("task") or DEFAULT_TASK
    if not isinstance(name, str):
        raise ConfigError(f"task must be a name, got {name!r}")
    return name


def _peek_task(argv: list[str]) -> Task:
    """The task a command line will run, to add its flags (an unreadable config or an
    unknown task is reported before parsing, as one line)."""
    from medtune.config import read_yaml

    config = peek(argv, "--config")
    raw = read_yaml(config) if config else {}
    return get_task(task_name_of(peek(argv, "--task"), raw))


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    add_run_arguments(
        parser, config_required=False,
        output_help="run folder (default checkpoints/<config stem>-<YYYYmmdd-HHMMSS>)",
    )
    parser.add_argument(
        "--task", default=None, choices=TASKS.names(),
        help=f"the task (default: the config's task: key, else {DEFAULT_TASK}); its flags follow",
    )
    task = _peek_task(list(argv))
    group = parser.add_argument_group(f"task '{task.name}'", task.description or None)
    task.add_finetune_arguments(group)


def build_config(task: Task, args: argparse.Namespace, raw: dict):
    """The YAML recipe + the task's flags + ``--data`` + ``--set`` -> the task's config."""
    overrides = []
    if args.data is not None:
        overrides.append(f"data.root={json.dumps(str(args.data))}")  # JSON: always a YAML string
    overrides += task.finetune_overrides(args, raw)
    return task.read_config(args.config, overrides + list(args.set))


def run(args: argparse.Namespace) -> int:
    from medtune.config import read_yaml
    from medtune.finetune.runner import finetune

    raw = read_yaml(args.config) if args.config else {}
    task = get_task(task_name_of(args.task, raw))
    cfg = build_config(task, args, raw)
    stem = Path(args.config).stem if args.config else task.name
    fetch_downloads(args, cfg)
    finetune(task, cfg, output=args.output, resume=args.resume, stem=stem)
    return 0
