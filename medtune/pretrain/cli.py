"""``medtune pretrain``: self-supervised pretraining of a backbone (FreMAE, MAE, SimMIM, MFM).

    medtune pretrain --config configs/fremae_swinunetr2d_brats.yaml --data data/BraTS2020 \\
        [--output DIR] [--set train.max_steps=5 ...] [--resume latest|DIR]

The same command runs on one process or many::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m medtune pretrain ...
    accelerate launch --num_processes 8 -m medtune pretrain ...          # 8 GPUs

The run folder (default ``checkpoints/<config stem>-<YYYYmmdd-HHMMSS>``) receives
``config.json`` (the resolved config), ``metrics.jsonl``, ``state/`` (resumable), and at
the end ``backbone.safetensors`` (the encoder: what finetuning loads),
``pretrain.safetensors`` (encoder + decoder), ``decoder.safetensors`` when the decoder
has blocks a segmenter takes over (FreMAE: the light decoder's trunk for segmentation
decoder ``multistage``, ``decoder: unetr``'s UNETR blocks for ``unetr``) and
``reconstruction.png``. A folder that
already holds a run is never overwritten unless ``--resume`` continues it.

With ``heldout_samples`` (default 64) the cases of the finetuning validation split
(``data.val_fraction``) are held out of pretraining; the objective's losses on them
(FreMAE: each band next to a zero prediction) go into ``metrics.jsonl`` as ``eval/*``
at every evaluation and into the run's last log line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medtune import distributed
from medtune.checkpoints.runs import (
    BACKBONE_FILE,
    CONFIG_FILE,
    DECODER_FILE,
    FIGURE_FILE,
    PRETRAIN_FILE,
    PRETRAIN_TASK,
    RunConfig,
    open_run,
    write_run_config,
)
from medtune.cli import add_run_arguments, fetch_downloads
from medtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    from medtune.data.config import add_data_arguments

    add_run_arguments(
        parser, config_required=True, output_help="run folder (default checkpoints/<config stem>-<YYYYmmdd-HHMMSS>)",
    )
    add_data_arguments(parser, folds=False)


def run(args: argparse.Namespace) -> int:
    from medtune.config import to_dict
    from medtune.pretrain.config import load_pretrain_config

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its save/load chatter
    from medtune.data.config import data_overrides

    # --data (data.root) and the data flags are shorthands applied before --set (which wins), as in finetune
    overrides = [f"data.root={json.dumps(str(args.data))}"] if args.data is not None else []  # JSON: a YAML string
    cfg = load_pretrain_config(args.config, overrides + data_overrides(args) + list(args.set))
    if cfg.data.root is None:
        raise ConfigError(f"{args.config}: no dataset; pass --data or set data.root")
    fetch_downloads(args, cfg)

    # The process group first (the run folder's timestamp must be the same on every
    # process), the Accelerator once the run folder (its trackers' log dir) is known.
    processes = distributed.processes()
    if not processes.is_main_process:  # one copy of the logs, from the main process
        logging.getLogger().setLevel(logging.WARNING)
    run_config = RunConfig(PRETRAIN_TASK, to_dict(cfg))
    with open_run(processes, args.output, Path(args.config).stem, args.resume, run_config) as run_dir:
        return _pretrain_in(cfg, run_config, run_dir, args.resume)


def _pretrain_in(cfg, run_config: RunConfig, run_dir: Path, resume) -> int:
    from medtune.trainer import make_accelerator

    accelerator = make_accelerator(cfg.train, run_dir)

    dataset, plan, heldout = distributed.main_first(
        accelerator, lambda: _build_datasets(cfg, run_dir, accelerator.is_local_main_process),
        per_node=not cfg.train.shared_filesystem,
    )
    run_config = RunConfig(run_config.task, run_config.config, {"data_plan": plan.to_json()})
    objective = _build_objective(cfg)
    freeze_unused(objective, dataset, cfg)
    if accelerator.is_main_process and resume is None:
        write_run_config(run_dir, run_config)
    # a resumed run's config.json changes only once its state has loaded
    on_start = (lambda: write_run_config(run_dir, run_config)) if resume is not None else None
    evaluate = None
    if heldout is not None:
        from medtune.pretrain.heldout import heldout_losses

        def evaluate(model):
            return heldout_losses(model, heldout, cfg.train.batch_size, seed=cfg.train.seed)

    result = _train(objective, dataset, cfg, run_dir, resume, accelerator, on_start, evaluate)

    if accelerator.is_main_process:
        if result.sharded:  # the modules hold shards: draw the figure on a whole copy
            objective = _build_objective(cfg)
            objective.load_state_dict(result.state_dict)
        written = save_outputs(objective, heldout if heldout is not None else dataset, cfg, run_dir,
                               result.state_dict)
        print(f"pretrained {cfg.objective.name} on {cfg.backbone.name} for {result.step} steps "
              f"({result.samples_per_s:.1f} samples/s); run folder: {run_dir}")
        print(f"encoder weights (for finetuning): {written['backbone']}")
        print(f"encoder + decoder weights:        {written['pretrain']}")
        if "decoder" in written:
            print(f"decoder blocks (for finetuning):  {written['decoder']}")
        if "figure" in written:
            print(f"reconstruction figure:            {written['figure']}")
        print(f"config:                           {run_dir / CONFIG_FILE}")
        if heldout is not None and result.eval_metrics:
            from medtune.pretrain.heldout import describe_heldout

            print(describe_heldout(result.eval_metrics, len(heldout)))
    distributed.barrier(accelerator)
    return 0


# --------------------------------------------------------------------------- building


def _build_datasets(cfg, run_dir: Path, show_progress: bool):
    """The training samples, the data plan and the held-out samples (None without
    ``heldout_samples`` or held-out cases): the fold's validation cases are held out."""
    from medtune.data.config import build_pretrain_data, build_pretrain_holdout
    from medtune.pretrain.heldout import spread_subset

    heldout = None
    if cfg.heldout_samples > 0:
        dataset, plan, heldout = build_pretrain_holdout(cfg.data, run_dir, show_progress=show_progress)
        if heldout is None:
            why = "data.stream" if cfg.data.stream else f"no case to hold out (data.val_fraction {cfg.data.val_fraction})"
            log.warning("%s: %s; held-out losses are not measured", cfg.data.root, why)
        elif len(heldout) == 0:
            heldout = None
        else:
            heldout = spread_subset(heldout, cfg.heldout_samples)
    else:
        dataset, plan = build_pretrain_data(cfg.data, run_dir, show_progress=show_progress)
    if len(dataset) == 0:
        raise DataError(f"{cfg.data.root}: no training samples (data.min_foreground too high?)")
    first = dataset[0]["image"]
    if first.shape[0] != cfg.backbone.in_chans:
        raise DataError(
            f"{cfg.data.root}: cases have {first.shape[0]} modalities but backbone.in_chans is "
            f"{cfg.backbone.in_chans}"
        )
    return dataset, plan, heldout


def _build_objective(cfg):
    import torch
    from accelerate.utils import set_seed

    from medtune.models import create_backbone
    from medtune.pretrain.objectives import build_objective

    set_seed(cfg.train.seed)  # the same initial weights on every process and every rerun
    backbone = create_backbone(cfg.backbone)
    objective = build_objective(cfg.objective, backbone)
    if not isinstance(getattr(objective, "backbone", None), torch.nn.Module):
        raise ConfigError(f"objective '{cfg.objective.name}' does not expose its .backbone")
    return objective


def freeze_unused(objective, dataset, cfg) -> list[str]:
    """Freeze parameters the objective never uses (e.g. a ViT's final norm when FreMAE
    reads intermediate blocks): they would get no update anyway, and DDP needs every
    trainable parameter to take part. One forward/backward on the first samples finds them."""
    from torch.utils.data import default_collate

    from medtune.trainer import unused_parameters

    if cfg.train.find_unused_parameters:
        return []
    probe = default_collate([dataset[i] for i in range(min(2, len(dataset)))])
    unused = unused_parameters(objective, probe)
    for name, param in objective.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    if unused:
        log.info("freezing %d parameters the %s objective does not use: %s",
                 len(unused), cfg.objective.name, ", ".join(unused[:4]) + (" ..." if len(unused) > 4 else ""))
    return unused


def _train(objective, dataset, cfg, run_dir: Path, resume, accelerator, on_start=None, evaluate=None):
    from medtune.trainer import build_loader, train

    workers = cfg.train.num_workers if cfg.train.num_workers is not None else cfg.data.num_workers
    loader = build_loader(dataset, cfg.train, num_workers=workers)
    unit = "slices" if cfg.data.mode == "2d" else "crops"
    return train(objective, loader, cfg.train, run_dir, resume=resume, accelerator=accelerator, unit=unit,
                 on_start=on_start, evaluate=evaluate)


# --------------------------------------------------------------------------- outputs


def save_outputs(objective, dataset, cfg, run_dir: Path, state: dict | None = None) -> dict[str, Path]:
    """Write the encoder, the whole objective, the transferable decoder blocks (if the
    objective has any) and the figure (main process only).

    ``state``: the objective's full weights (the trainer's gathered ``state_dict``);
    default ``objective.state_dict()``.
    """
    from medtune.checkpoints.io import save_safetensors

    state = objective.state_dict() if state is None else state
    encoder = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    meta = {"format": "medtune", "kind": "pretrain", "objective": cfg.objective.name, "backbone": cfg.backbone.name}
    written = {
        "backbone": save_safetensors(encoder, run_dir / BACKBONE_FILE, meta),
        "pretrain": save_safetensors(state, run_dir / PRETRAIN_FILE, meta),
    }
    blocks = transferable_state(objective, state)
    if blocks is not None:
        written["decoder"] = save_safetensors(blocks, run_dir / DECODER_FILE, meta)
    if cfg.figure:
        figure = _save_figure(objective, dataset, cfg, run_dir / FIGURE_FILE)
        if figure is not None:
            written["figure"] = figure
    return written


def transferable_state(objective, state: dict) -> dict | None:
    """The tensors of ``state`` (the objective's full state dict) that belong to its
    transferable decoder blocks (``objective.transferable_decoder()``), under the blocks'
    own names; None when the objective has none."""
    transferable = getattr(objective, "transferable_decoder", None)
    blocks = transferable() if callable(transferable) else None
    if blocks is None:
        return None
    # the blocks may be a view of the objective's modules, so match tensors, not prefixes
    names = {id(tensor): name for name, tensor in objective.state_dict(keep_vars=True).items()}
    return {key: state[names[id(tensor)]] for key, tensor in blocks.state_dict(keep_vars=True).items()}


def _save_figure(objective, dataset, cfg, path: Path) -> Path | None:
    import torch
    from torch.utils.data import default_collate

    try:
        from medtune.pretrain.figure import save_reconstruction
    except ImportError as exc:
        log.warning("no reconstruction figure: %s", exc)
        return None
    count = min(cfg.figure_samples, len(dataset))
    # the samples with the most foreground make a readable figure; the first ones are often empty
    batch = default_collate([dataset[i] for i in _figure_indices(dataset, count)])
    device = next(objective.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = objective.training
    objective.eval()
    try:
        torch.manual_seed(cfg.train.seed)  # the same masks every time the figure is drawn
        reconstruction = objective.reconstruct(batch)
        title = f"{cfg.objective.name} on {cfg.backbone.name}, modality 0"
        save_reconstruction(path, reconstruction, max_samples=count, title=title)
    finally:
        objective.train(was_training)
    return path


def _figure_indices(dataset, count: int) -> list[int]:
    """``count`` evenly spread samples (deterministic), preferring ones with foreground."""
    total = len(dataset)
    probe = sorted({round(i * (total - 1) / max(1, 4 * count - 1)) for i in range(4 * count)})
    scored = sorted(probe, key=lambda i: -float(dataset[i]["foreground"].float().mean()))
    return sorted(scored[:count])
