"""The pieces :func:`medtune.trainer.train` is built from: schedule, optimizer, loader,
Accelerator, best-checkpoint rules, unused-parameter probe."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from medtune import distributed
from medtune.errors import ConfigError, MedtuneError
from medtune.trainer.config import OptimConfig, ScheduleConfig, TrainConfig

log = logging.getLogger(__name__)


# glibc's mallopt parameters (malloc.h) and the values tune_host_allocator sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
HOST_ALLOCATOR_SETTINGS = {  # parameter: (mallopt number, value)
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's largest: blocks below come from the heap
    "MALLOC_MMAP_MAX_": (_M_MMAP_MAX, 0),  # no block gets a mapping of its own: larger ones too
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 1 << 30),  # free heap top kept before returning it
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 64 << 20),  # extra heap grown at once
}
_host_allocator_tuned = False


def tune_host_allocator() -> bool:
    """Make glibc's malloc keep freed memory for the next training step (once per process).

    By default glibc serves every block above a dynamic threshold (128 KiB, growing to at
    most 32 MiB) with its own ``mmap`` and returns it with ``munmap`` when freed, and gives
    the heap's free top back to the system once it exceeds 128 KiB; a CPU training step
    allocates and frees the same activations every step, so each step faults and zeroes
    their pages again. This sets, with ``mallopt``, the mmap threshold to 32 MiB and the
    number of mappings to 0 (every block, however large, comes from the heap: ViT-B's
    32 MiB complex maps in FreMAE's step too), the trim threshold to 1 GiB and the top pad
    to 64 MiB. The process then keeps its largest step's memory, and up to about 1 GiB of
    free heap top besides. A parameter the user set in the environment
    (``MALLOC_MMAP_THRESHOLD_`` ...) is left as set; a user's mmap threshold also keeps
    the mappings (the number of mappings is then not set). Returns whether anything was
    set: false off Linux/glibc, or when called before in this process.
    """
    global _host_allocator_tuned
    if _host_allocator_tuned:
        return False
    _host_allocator_tuned = True
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    user_set = {name for name in HOST_ALLOCATOR_SETTINGS if name in os.environ}
    if "MALLOC_MMAP_THRESHOLD_" in user_set:  # the user wants blocks above it mapped
        user_set.add("MALLOC_MMAP_MAX_")
    done = [name for name, (param, value) in HOST_ALLOCATOR_SETTINGS.items()
            if name not in user_set and mallopt(param, value) == 1]
    if done:
        log.debug("host allocator: set %s", ", ".join(done))
    return bool(done)


def lr_factor(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak lr used by the optimizer update number ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (no zero-lr step).
    After it, with ``t = (step - warmup) / (total_steps - warmup)`` in ``[0, 1)`` and
    ``m = min_lr_ratio``: poly ``m + (1 - m)(1 - t)^power``, cosine
    ``m + (1 - m)(1 + cos(pi t)) / 2``, constant ``1``.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule.name == "poly":
        decay = (1.0 - t) ** schedule.power
    elif schedule.name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ConfigError(f"unknown schedule.name '{schedule.name}'")
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * decay


LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch --mixed_precision` / its config


def resolve_mixed_precision(requested: str) -> str:
    """The precision a run trains in.

    ``"auto"`` defers to the launcher (``accelerate launch --mixed_precision X`` or the
    ``accelerate config`` file, which Accelerate passes on as ``ACCELERATE_MIXED_PRECISION``),
    else bf16 on a CUDA device that supports it, else ``"no"`` (fp32). An explicit
    ``train.mixed_precision`` wins over the launcher, with a log line when they differ.
    """
    launcher = os.environ.get(LAUNCHER_PRECISION)
    if requested != "auto":
        if launcher and launcher != requested:
            log.info("train.mixed_precision %s from the config (the launcher asked for %s)", requested, launcher)
        return requested
    if launcher:
        if launcher not in ("no", "bf16", "fp16", "fp8"):
            raise ConfigError(f"{LAUNCHER_PRECISION}={launcher!r}: not a precision (no, bf16, fp16)")
        return launcher
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


@dataclass
class LrGroup:
    """A model's parameters with their own learning rate: those whose names start with
    ``prefix`` (or one of several prefixes) train at ``scale`` x the run's lr, and their
    schedule (warmup, then decay to the run's last step) starts again at optimizer step
    ``restart`` (0: the run's own). Before ``restart`` they follow a schedule of their own
    over those steps, or, ``frozen`` before it, stay at lr 0. A model asks for them with a
    method ``lr_groups() -> list[LrGroup]``."""

    prefix: str | tuple[str, ...]
    scale: float = 1.0
    restart: int = 0
    frozen: bool = False


def layer_decay_groups(model: nn.Module, decay: float, option: str = "optim.layer_decay",
                       verb: str = "decay") -> list[LrGroup]:
    """``optim.layer_decay``'s groups: for every backbone in ``model`` (a module with a
    ``layer_ids()`` method, as :meth:`medtune.models.backbones.Backbone.layer_ids`) with
    layers ``0..K``, layer ``i`` at ``decay ** (K + 1 - i)`` x the lr; the rest of the
    model, as BEiT's and MAE's classification head, stays at the lr. Each parameter is
    named exactly (a group's prefixes are full parameter names). ``option`` and ``verb``
    name the setting in the error when ``model`` holds no backbone."""
    backbones = [(name, m) for name, m in model.named_modules() if callable(getattr(m, "layer_ids", None))]
    if not backbones:
        raise ConfigError(f"{option}: {type(model).__name__} holds no medtune backbone to {verb}")
    groups = []
    for prefix, backbone in backbones:
        ids = backbone.layer_ids()
        top = max(ids.values())
        names: dict[int, list[str]] = {}
        for name, _ in backbone.named_parameters():
            names.setdefault(ids.get(name, top), []).append(f"{prefix}.{name}" if prefix else name)
        groups += [LrGroup(tuple(names[i]), decay ** (top + 1 - i)) for i in sorted(names)]
    return groups


def backbone_parameter_names(model: nn.Module, option: str, verb: str) -> set[str]:
    """The full names of every backbone parameter in ``model`` (layer decay's groups at
    decay 1); ``option`` and ``verb`` name the setting in the error when it holds none."""
    return {name for group in layer_decay_groups(model, 1.0, option, verb) for name in group.prefix}


def freeze_backbone_groups(model: nn.Module, steps: int, groups: Sequence[LrGroup]) -> list[LrGroup]:
    """``optim.freeze_backbone_steps``: ``groups`` (the model's own, then layer decay's)
    with every backbone parameter at lr 0 for the first ``steps`` optimizer steps and its
    schedule restarted at ``steps``. Groups made of backbone parameters only (layer decay's,
    one per layer) are frozen in place; without them one group at the run's lr holds the
    backbone. Other groups are left as they are (they match first, so a backbone parameter
    in one of them is not frozen)."""
    backbone = backbone_parameter_names(model, "optim.freeze_backbone_steps", "freeze")
    decayed = [isinstance(g.prefix, tuple) and set(g.prefix) <= backbone for g in groups]
    if any(decayed):
        return [replace(g, restart=steps, frozen=True) if d else g for g, d in zip(groups, decayed)]
    return [*groups, LrGroup(tuple(sorted(backbone)), 1.0, restart=steps, frozen=True)]


class BackboneAnchor:
    """``optim.anchor_decay`` (decoupled L2-SP): every trainable backbone parameter of
    ``model`` with a copy of its value now, the anchor. :meth:`pull` moves each parameter
    ``lr x decay`` of the way back to its anchor, at the lr of the optimizer group that
    holds it (layer decay's and a frozen backbone's lrs apply alike). Make it before the
    optimizer's first step: a resumed run rebuilds the model as the fresh run did (the
    same pretrained or seeded weights) before its state loads, so its anchors are the
    fresh run's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        names = backbone_parameter_names(model, "optim.anchor_decay", "anchor")
        self.decay = decay
        self.anchors = {id(p): p.detach().clone() for name, p in model.named_parameters()
                        if name in names and p.requires_grad}

    @torch.no_grad()
    def pull(self, optimizer: torch.optim.Optimizer) -> None:
        """One pull after ``optimizer``'s step: ``p <- p + lr x decay x (anchor - p)``."""
        for group in optimizer.param_groups:
            weight = group["lr"] * self.decay
            if weight == 0.0:
                continue
            for param in group["params"]:
                anchor = self.anchors.get(id(param))
                if anchor is not None:
                    param.lerp_(anchor, weight)


def split_lr_groups(model: nn.Module, params: Sequence[nn.Parameter], groups: Sequence[LrGroup]) -> list[dict]:
    """``params`` as optimizer parameter groups: the run's group first, then one per
    :class:`LrGroup` that holds any of them (in order; a parameter goes to the first match)."""
    names = {id(p): name for name, p in model.named_parameters()}
    buckets: list[list[nn.Parameter]] = [[] for _ in range(len(groups) + 1)]
    for param in params:
        name = names.get(id(param), "")
        index = next((i + 1 for i, g in enumerate(groups) if name.startswith(g.prefix)), 0)  # str or tuple
        buckets[index].append(param)
    return [{"params": bucket, "group": group} for bucket, group in zip(buckets, [None, *groups]) if bucket]


def group_lr_factors(param_groups: Sequence[dict], total_steps: int, schedule) -> list[Callable[[int], float]]:
    """One ``LambdaLR`` factor per group of :func:`split_lr_groups` (plain parameter
    lists have one group: the run's schedule)."""
    def factor(group: LrGroup | None) -> Callable[[int], float]:
        if group is None:
            return lambda step: lr_factor(step, total_steps, schedule)
        start = group.restart

        def restarted(step: int) -> float:
            if step < start:
                return 0.0 if group.frozen else group.scale * lr_factor(step, max(start, 1), schedule)
            return group.scale * lr_factor(step - start, max(total_steps - start, 1), schedule)

        return restarted

    return [factor(g.get("group")) if isinstance(g, dict) else factor(None) for g in param_groups]


def build_optimizer(params: Sequence[nn.Parameter] | Sequence[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` (tensors, or groups of :func:`split_lr_groups`) as
    configured (fused kernels when ``cfg.fused`` and every parameter is floating point)."""
    optim_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    params = list(params)
    if params and isinstance(params[0], dict):
        tensors = [p for g in params for p in g["params"]]
        params = [{"params": g["params"]} for g in params]
    else:
        tensors = params
    fused = True if cfg.fused and all(p.is_floating_point() for p in tensors) else None
    return optim_cls(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, fused=fused
    )


def build_loader(
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
    collate_fn: Callable | None = None,
    num_workers: int | None = None,
) -> DataLoader:
    """The per-process training loader for :func:`train`.

    Shuffling uses a plain ``RandomSampler``; once the loader is prepared by Accelerate
    it becomes a sampler reseeded with ``cfg.seed + epoch`` on every process, which is
    what makes the data order reproducible on resume. An ``IterableDataset`` (a data
    stream, :mod:`medtune.data.stream`) orders itself and is read in this process.
    Workers: ``num_workers``, else ``cfg.num_workers``, else 0. They are not persistent, so that a dataset's
    ``set_epoch`` (called by :func:`train`) reaches them.
    """
    workers = num_workers if num_workers is not None else (cfg.num_workers or 0)
    sampler = None
    if isinstance(dataset, IterableDataset):
        # a stream orders itself (by seed and epoch) and reads ahead with its own threads;
        # worker processes would each read every case
        workers = 0
    else:
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
    )


def make_accelerator(cfg: TrainConfig, run_dir: str | Path | None = None, trackers: Sequence[str] | None = None):
    """The Accelerator :func:`train` expects (pass it back in to share it with evaluation).

    Accumulation is driven by ``cfg.grad_accum`` and does not resync at epoch ends,
    so every optimizer step sees exactly ``grad_accum`` micro-batches.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    log_with = []
    for name in trackers if trackers is not None else cfg.trackers:
        if name == "tensorboard" and not _tensorboard_available():
            log.warning("tracker 'tensorboard' requested but tensorboard is not installed; not logging to it")
            continue
        log_with.append(name)
    project = None
    if run_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs"), save_on_each_node=not cfg.shared_filesystem
        )
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=project,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    distributed.release_group_at_exit()  # once, however many accelerators a process makes
    return accelerator


def higher_is_better(key: str) -> Callable[[Mapping[str, float], Mapping[str, float]], bool]:
    """``is_better`` for :func:`train`: the new evaluation wins when ``key`` is larger."""

    def is_better(new: Mapping[str, float], best: Mapping[str, float]) -> bool:
        return _metric(new, key) > _metric(best, key)

    is_better.key = key  # type: ignore[attr-defined]
    return is_better


def lower_is_better(key: str) -> Callable[[Mapping[str, float], Mapping[str, float]], bool]:
    """``is_better`` for :func:`train`: the new evaluation wins when ``key`` is smaller."""

    def is_better(new: Mapping[str, float], best: Mapping[str, float]) -> bool:
        return _metric(new, key) < _metric(best, key)

    is_better.key = key  # type: ignore[attr-defined]
    return is_better


def unused_parameters(model: nn.Module, batch: Any) -> list[str]:
    """Names of trainable parameters that get no gradient from ``model(batch)["loss"]``.

    DDP refuses such parameters unless told to search for them on every step
    (``find_unused_parameters``, slower); a model whose graph never changes can freeze
    them instead (they would never be updated anyway). Gradients are cleared and buffers
    (e.g. BatchNorm running statistics) restored afterwards, so the model is unchanged.
    """
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    try:
        _loss_of(model(batch)).backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return unused


def _loss_of(out: Any) -> torch.Tensor:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise MedtuneError(f"the model's forward must return a dict with a 'loss', got {type(out).__name__}")
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise MedtuneError("the model's 'loss' must be a scalar tensor")
    return loss


def _metric(metrics: Mapping[str, float], key: str) -> float:
    if key not in metrics:
        raise ConfigError(f"evaluation has no metric '{key}' (has: {', '.join(metrics)})")
    return float(metrics[key])


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
