"""``medtune finetune``: finetune a backbone on labeled data, for any of three tasks.

The task comes from ``--task`` or the config's top-level ``task:`` key (default
``segmentation``). Segmentation is handled here (:func:`finetune_segmentation`);
``referring`` and ``vqa`` are handed to ``medtune.finetune.referring`` /
``medtune.finetune.vqa``, whose ``finetune_main(args) -> int`` read the same flags::

    accelerate launch -m medtune finetune --config configs/medtuning_vit_b16_brats.yaml \\
        --data data/BraTS2020 --backbone checkpoints/fremae-run --output checkpoints/medtuning
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from medtune.cli import add_run_arguments
from medtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

TASK_MODULES = {"referring": "medtune.finetune.referring", "vqa": "medtune.finetune.vqa"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(
        parser, config_required=False, output_help="run folder (default: the config's output)",
        resume_help="continue a run: 'latest' (newest state/step_N of --output) or a run / state/step_N "
        "folder; without it, an --output that holds a trained run is refused",
    )
    parser.add_argument(
        "--backbone", default=None,
        help="pretrained backbone: a FreMAE/pretrain run folder (its config.json backbone section "
        "and backbone.safetensors) or a local weight file (sets backbone.pretrained); "
        "referring: the CLIP architecture name",
    )
    parser.add_argument("--clip-weights", default=None, help="local CLIP weights (referring, vqa)")
    parser.add_argument("--text-weights", default=None, help="local text-encoder weights (vqa)")
    parser.add_argument(
        "--self-distill", action="store_true",
        help="add masked-input self-distillation (the config's self_distill section, or its defaults)",
    )
    parser.add_argument("--task", default=None, choices=("segmentation", *TASK_MODULES), help="overrides the config's task: key (default segmentation)")


def resolve_task(args: argparse.Namespace, raw: dict) -> str:
    task = args.task or raw.get("task") or "segmentation"
    if task not in ("segmentation", *TASK_MODULES):
        raise ConfigError(f"unknown task '{task}' (segmentation, {', '.join(TASK_MODULES)})")
    return task


def backbone_section_from(source: str | Path) -> dict:
    """The ``backbone:`` section for ``--backbone``: a run folder's config.json backbone
    section with ``pretrained`` pointing at the folder, or ``{"pretrained": file}``."""
    from medtune.checkpoints.io import load_json

    source = Path(source)
    if source.is_dir():
        config_file = source / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"--backbone {source}: run folder has no config.json")
        if not (source / "backbone.safetensors").is_file():
            raise CheckpointError(f"--backbone {source}: run folder has no backbone.safetensors")
        section = load_json(config_file).get("backbone")
        if not isinstance(section, dict):
            raise CheckpointError(f"{config_file}: no 'backbone' section")
        return {**section, "pretrained": str(source)}
    if not source.is_file():
        raise CheckpointError(f"--backbone {source}: no such run folder or weight file")
    return {"pretrained": str(source)}


def build_config(args: argparse.Namespace, raw: dict):
    """YAML mapping + ``--backbone`` + ``--data`` + ``--set`` + ``--self-distill`` -> FinetuneConfig."""
    from medtune.config import apply_overrides, from_dict
    from medtune.finetune.config import FinetuneConfig

    raw = dict(raw)
    raw["task"] = "segmentation"
    if args.backbone:
        section = backbone_section_from(args.backbone)
        raw["backbone"] = {**(raw.get("backbone") or {}), **section} if "name" not in section else section
    if args.data:
        raw.setdefault("data", {})
        raw["data"] = {**(raw["data"] or {}), "root": args.data}
    if args.output:
        raw["output"] = args.output
    apply_overrides(raw, list(args.set))
    if args.self_distill and raw.get("self_distill") is None:
        raw["self_distill"] = {}
    try:
        cfg = from_dict(FinetuneConfig, raw)
        from medtune.adapters import adapter_config_from_dict

        adapter_config_from_dict(cfg.adapter)  # unknown adapter keys fail before any data is read
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}" if args.config else str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from medtune.config import read_yaml

    raw = read_yaml(args.config) if args.config else {}
    task = resolve_task(args, raw)
    if task != "segmentation":
        try:
            module = importlib.import_module(TASK_MODULES[task])
        except ModuleNotFoundError as exc:
            raise ConfigError(f"task '{task}' is not available in this install ({exc})") from None
        return int(module.finetune_main(args) or 0)
    for flag in ("clip_weights", "text_weights"):
        if getattr(args, flag):
            raise ConfigError(f"--{flag.replace('_', '-')} is for the referring and vqa tasks, not segmentation")
    from medtune.finetune.segmentation import finetune_segmentation

    cfg = build_config(args, raw)
    if cfg.data.root is None:
        raise ConfigError("no dataset: pass --data DIR or set data.root")
    result = finetune_segmentation(cfg, cfg.output, resume=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        best = f"; best {result.best_metrics} at step {result.best_step}" if result.best_metrics else ""
        log.info("finetuning finished after %d steps in %s%s", result.step, cfg.output, best)
    return 0
