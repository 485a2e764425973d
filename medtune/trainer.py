"""The one training loop of medtune, on Hugging Face Accelerate.

Every medtune run (pretraining, finetuning, vision-language) trains through
:func:`train`: the caller builds a model whose ``forward(batch)`` returns a dict with a
scalar ``"loss"`` (plus any scalar logs) and a data loader; the trainer owns the rest::

    cfg = TrainConfig(max_steps=1000, batch_size=8, optim=OptimConfig(lr=1e-4))
    loader = build_loader(dataset, cfg)
    result = train(model, loader, cfg, run_dir="checkpoints/run")

What the loop does, in order, for each optimizer step:

- ``grad_accum`` micro-batches are drawn from one continuous stream of batches (epochs
  are reshuffled with a sampler seeded by ``seed + epoch``, the same on every process,
  then sharded by Accelerate); the global batch is
  ``batch_size * grad_accum * num_processes``.
- Before each micro-batch's forward, the RNGs (torch, numpy, random) are reseeded from
  ``(seed, micro-batch index, process index)``, so the randomness a model draws
  (masks, noise) depends only on where the run is, never on how it got there.
- Gradients are clipped (``accelerator.clip_grad_norm_``), the optimizer steps and the
  learning rate follows warmup then poly/cosine decay (:func:`lr_factor`).
- Every ``log_every`` steps the process-averaged logs go to ``run_dir/metrics.jsonl``
  (main process), the tqdm bar (main process) and any trackers; every ``eval_every``
  steps ``evaluate(model)`` runs and the best result is tracked; every ``save_every``
  steps ``accelerator.save_state`` writes ``run_dir/state/step_{N:07d}`` (the last
  ``keep_last`` are kept).

Because the data order is a function of (seed, epoch) and the model's randomness a
function of (seed, micro-batch), a run killed after a save and resumed with
``resume="latest"`` ends with the same weights as one that was never interrupted.
That holds when the dataset's ``__getitem__`` is deterministic (random augmentation
inside DataLoader workers is not replayed).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from medtune.errors import CheckpointError, ConfigError, DataError, MedtuneError

log = logging.getLogger(__name__)

STATE_DIR = "state"
METRICS_FILE = "metrics.jsonl"
TRAINER_STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


# --------------------------------------------------------------------------- configs


@dataclass
class OptimConfig:
    """The optimizer, built over the model's ``requires_grad`` parameters."""

    name: str = "adamw"  # "adam" (L2 penalty in the gradient) or "adamw" (decoupled decay)
    lr: float = 1e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.0  # applied to every trainable parameter
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    amsgrad: bool = False  # AMSGrad variant (Med-Tuning's recipe uses it)

    def __post_init__(self) -> None:
        if self.name not in ("adam", "adamw"):
            raise ValueError(f"optim.name must be 'adam' or 'adamw', got '{self.name}'")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.betas}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay to ``min_lr_ratio * lr``."""

    name: str = "poly"  # "poly" (1 - t)^power, "cosine", or "constant" after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from lr/warmup_steps to lr
    power: float = 0.9  # exponent of the poly decay
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak lr

    def __post_init__(self) -> None:
        if self.name not in ("poly", "cosine", "constant"):
            raise ValueError(f"schedule.name must be poly, cosine or constant, got '{self.name}'")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """How to train: steps, batches, precision, seeding, logging and saving."""

    max_steps: int = 1000  # optimizer steps (each of grad_accum micro-batches)
    batch_size: int = 8  # samples per micro-batch per process
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA with bf16, else fp32), "no", "bf16", "fp16"
    seed: int = 0  # seeds data order (seed + epoch) and per-micro-batch randomness
    log_every: int = 10  # optimizer steps between metrics.jsonl lines / progress updates
    save_every: int = 0  # optimizer steps between resumable states (and at the end); 0 never saves
    keep_last: int = 2  # how many saved states to keep under run_dir/state
    eval_every: int = 0  # optimizer steps between evaluate() calls (0: only at the end)
    num_workers: int | None = None  # DataLoader workers of build_loader; None: the run's data.num_workers (CLIs) or 0
    find_unused_parameters: bool = False  # DDP flag for models with parameters unused in forward
    trackers: list[str] = field(default_factory=list)  # extra loggers, e.g. ["tensorboard"]
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the lr schedule

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                f"train.mixed_precision must be auto, no, bf16 or fp16, got '{self.mixed_precision}'"
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0 or null, got {self.num_workers}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class TrainResult:
    """What :func:`train` returns (identical on every process)."""

    step: int  # optimizer steps done in total (including those before a resume)
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # last logged training metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)  # last evaluation
    best_metrics: dict[str, float] | None = None  # best evaluation under is_better
    best_step: int | None = None  # the step of best_metrics
    state_dir: Path | None = None  # the last saved resumable state
    seconds: float = 0.0  # wall time of this call
    samples_per_s: float = 0.0  # global training throughput of this call


# --------------------------------------------------------------------------- pure pieces


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


def resolve_mixed_precision(requested: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a CUDA device that supports it, else ``"no"`` (fp32)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def build_optimizer(params: Sequence[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` as configured."""
    optim_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optim_cls(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad
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
    what makes the data order reproducible on resume. Workers: ``num_workers``, else
    ``cfg.num_workers``, else 0. They are not persistent, so that a dataset's
    ``set_epoch`` (called by :func:`train`) reaches them.
    """
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    workers = num_workers if num_workers is not None else (cfg.num_workers or 0)
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
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs"))
    return Accelerator(
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


def wait_for_everyone(processes) -> None:
    """``accelerator.wait_for_everyone()`` that also works for CPU process groups on GPU machines.

    Accelerate passes ``device_ids=[local rank]`` to the barrier even for a gloo (CPU)
    group, which fails with "invalid device ordinal" when ``ACCELERATE_USE_CPU`` runs more
    processes than the machine has GPUs. ``processes``: an Accelerator or PartialState.
    """
    from accelerate.utils import DistributedType

    if processes.distributed_type == DistributedType.MULTI_CPU:
        torch.distributed.barrier()
    else:
        processes.wait_for_everyone()


def find_latest_state(path: str | Path) -> Path | None:
    """The newest complete ``step_NNNNNNN`` state under ``path`` or ``path/state``."""
    path = Path(path)
    root = path / STATE_DIR if (path / STATE_DIR).is_dir() else path
    if not root.is_dir():
        return None
    done = [
        (int(m.group(1)), d)
        for d in root.iterdir()
        if (m := _STEP_DIR.match(d.name)) and (d / TRAINER_STATE_FILE).is_file()
    ]
    return max(done)[1] if done else None


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    train_loader: DataLoader | Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: str | Path | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    is_better: Callable[[Mapping[str, float], Mapping[str, float]], bool] | None = None,
    on_best: Callable[[nn.Module, Mapping[str, float]], None] | None = None,
    accelerator: Any | None = None,
    trackers: Sequence[str] | None = None,
    unit: str = "samples",
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps; see the module docstring.

    Args:
        model: ``model(batch)`` returns ``{"loss": scalar tensor, **scalar logs}``.
            It is trained in place (on return it holds the final weights, unwrapped).
        train_loader: a loader from :func:`build_loader` (or any DataLoader; a
            ``RandomSampler`` is made reproducible by Accelerate), or a Dataset, for
            which :func:`build_loader` is called.
        cfg: the :class:`TrainConfig`.
        run_dir: where ``metrics.jsonl``, ``state/`` and tracker logs go.
        resume: ``"latest"`` (newest state under ``run_dir``), a run folder or a
            ``state/step_NNNNNNN`` folder to continue from.
        evaluate: ``evaluate(model) -> {name: float}``, called on every process with
            the unwrapped model in eval mode every ``cfg.eval_every`` steps and at the end.
        is_better: ``is_better(new, best) -> bool`` picks the best evaluation
            (:func:`higher_is_better`, :func:`lower_is_better`).
        on_best: ``on_best(model, metrics)`` on the main process whenever a new best
            evaluation is found (e.g. to save the best weights).
        accelerator: an Accelerator from :func:`make_accelerator`; made here if None.
        trackers: overrides ``cfg.trackers`` (e.g. ``["tensorboard"]``).
        unit: what one sample is called in the progress bar ("slices", "crops").
    """
    if on_best is not None and is_better is None:
        raise ConfigError("train(): on_best needs is_better to know which evaluation is best")
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    if accelerator is None:
        accelerator = make_accelerator(cfg, run_dir, trackers)
    elif accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise ConfigError(
            f"train(): the accelerator accumulates {accelerator.gradient_accumulation_steps} "
            f"micro-batches but train.grad_accum is {cfg.grad_accum}; build it with make_accelerator(cfg)"
        )
    set_seed(cfg.seed)
    if isinstance(train_loader, Dataset) and not isinstance(train_loader, DataLoader):
        train_loader = build_loader(train_loader, cfg)
    if len(train_loader) == 0:
        raise DataError(
            f"training data has {len(train_loader.dataset)} samples, fewer than one batch of "
            f"{cfg.batch_size}; lower train.batch_size or add data"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("train(): the model has no trainable parameters (all requires_grad=False)")
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.max_steps, cfg.schedule)
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    batches_per_epoch = len(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = _LoopState()
    if resume is not None:
        state_dir = _resolve_resume(resume, run_dir)
        accelerator.load_state(str(state_dir))
        state = _LoopState.from_json(state_dir / TRAINER_STATE_FILE)
        log.info("resumed from %s at step %d", state_dir, state.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run_dir / METRICS_FILE, state.step)
        if accelerator.log_with:
            accelerator.init_trackers(run_dir.name, config=_flat_config(cfg))

    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    log.info(
        "training %d steps of %d %s (%d per process x %d accumulated x %d processes), %s precision",
        cfg.max_steps, global_batch, unit, cfg.batch_size, cfg.grad_accum,
        accelerator.num_processes, accelerator.mixed_precision,
    )
    batches = _batch_stream(loader, batches_per_epoch, state.step * cfg.grad_accum)
    progress = _progress(accelerator, cfg.max_steps, state.step, unit)
    sums: dict[str, torch.Tensor] = {}  # running sums of the logs since the last log line
    counts: dict[str, int] = {}
    window_samples, window_start = 0, time.perf_counter()
    call_samples, call_start = 0, time.perf_counter()
    result = TrainResult(step=state.step, run_dir=run_dir)

    model.train()
    while state.step < cfg.max_steps:
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            _seed_micro_batch(cfg.seed, state.step * cfg.grad_accum + micro, accelerator.process_index)
            with accelerator.accumulate(model):
                out = model(batch)
                loss = _loss_of(out)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if cfg.grad_clip is not None:
                        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
                        _add(sums, counts, "grad_norm", grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            _add_logs(sums, counts, out)
            window_samples += _batch_len(batch)
        lr = scheduler.get_last_lr()[0]
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the lr where it was
            scheduler.step()
        state.step += 1
        progress.update(1)

        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            metrics = _reduce_logs(accelerator, sums, counts)
            metrics["lr"] = lr
            metrics["samples_per_s"] = window_samples * accelerator.num_processes / max(elapsed, 1e-9)
            metrics["epoch"] = state.step * cfg.grad_accum / batches_per_epoch
            _check_finite(metrics, state.step)
            _log_metrics(accelerator, run_dir, state.step, metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.4g}", **{f"{unit}/s": f"{metrics['samples_per_s']:.1f}"})
            result.metrics = metrics
            call_samples += window_samples
            sums, counts, window_samples, window_start = {}, {}, 0, time.perf_counter()

        is_last = state.step == cfg.max_steps
        if evaluate is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or is_last):
            result.eval_metrics = _run_evaluation(accelerator, model, evaluate, is_better, on_best, state, run_dir)
        if cfg.save_every and (state.step % cfg.save_every == 0 or is_last):
            result.state_dir = _save_state(accelerator, run_dir, state, cfg.keep_last)
    progress.close()

    wait_for_everyone(accelerator)
    if accelerator.log_with:
        accelerator.end_training()
    result.step = state.step
    result.best_metrics, result.best_step = state.best_metrics, state.best_step
    result.seconds = time.perf_counter() - call_start
    result.samples_per_s = (call_samples * accelerator.num_processes) / max(result.seconds, 1e-9)
    return result


# --------------------------------------------------------------------------- internals


@dataclass
class _LoopState:
    """What the loop needs on resume besides Accelerate's state (stored as JSON)."""

    step: int = 0
    best_metrics: dict[str, float] | None = None
    best_step: int | None = None

    def to_json(self) -> dict:
        return {"step": self.step, "best_metrics": self.best_metrics, "best_step": self.best_step}

    @classmethod
    def from_json(cls, path: Path) -> "_LoopState":
        try:
            data = json.loads(path.read_text())
            return cls(step=int(data["step"]), best_metrics=data.get("best_metrics"), best_step=data.get("best_step"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a medtune trainer state ({exc})") from None


def _resolve_resume(resume: str | Path, run_dir: Path) -> Path:
    if str(resume) == "latest":
        found = find_latest_state(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir / STATE_DIR}: no saved state to resume from")
        return found
    path = Path(resume)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    found = find_latest_state(path)
    if found is None:
        raise CheckpointError(f"{path}: no saved state to resume from (expected {STATE_DIR}/step_NNNNNNN)")
    return found


def _batch_stream(loader, batches_per_epoch: int, consumed: int) -> Iterator[Any]:
    """Batches from micro-batch number ``consumed`` on, epoch after epoch, reproducibly."""
    from accelerate import skip_first_batches

    epoch, skip = divmod(consumed, batches_per_epoch)
    while True:
        loader.set_epoch(epoch)  # the seedable sampler shuffles with seed + epoch
        if hasattr(loader.dataset, "set_epoch"):  # e.g. crop positions; Accelerate skips it when sharded
            loader.dataset.set_epoch(epoch)
        source = skip_first_batches(loader, skip) if skip else loader
        if skip:
            source.set_epoch(epoch)
        yield from source
        epoch, skip = epoch + 1, 0


def _seed_micro_batch(seed: int, micro_index: int, process_index: int) -> None:
    """Reseed torch/numpy/random from (seed, micro-batch, process): replayable randomness."""
    value = int(np.random.SeedSequence([seed, micro_index, process_index]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _loss_of(out: Any) -> torch.Tensor:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise MedtuneError(f"the model's forward must return a dict with a 'loss', got {type(out).__name__}")
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise MedtuneError("the model's 'loss' must be a scalar tensor")
    return loss


def _add(sums: dict[str, torch.Tensor], counts: dict[str, int], key: str, value: Any) -> None:
    value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    sums[key] = sums[key] + value if key in sums else value
    counts[key] = counts.get(key, 0) + 1


def _add_logs(sums: dict[str, torch.Tensor], counts: dict[str, int], out: Mapping[str, Any]) -> None:
    for key, value in out.items():
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            _add(sums, counts, key, value)


def _reduce_logs(accelerator, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
    """Means over the window's micro-batches (steps for grad_norm) and processes (one sync)."""
    if not sums:
        return {}
    keys = sorted(sums)
    means = torch.stack([sums[k].to(accelerator.device) / counts[k] for k in keys])
    means = accelerator.reduce(means, reduction="mean")
    return dict(zip(keys, means.tolist()))


def _check_finite(metrics: Mapping[str, float], step: int) -> None:
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise MedtuneError(f"training diverged: loss is {loss} at step {step} (lower optim.lr?)")


def _log_metrics(accelerator, run_dir: Path, step: int, metrics: Mapping[str, float]) -> None:
    if accelerator.is_main_process:
        with open(run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
    if accelerator.log_with:
        accelerator.log(dict(metrics), step=step)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` by a run that was killed before its next save."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _run_evaluation(accelerator, model, evaluate, is_better, on_best, state: _LoopState, run_dir: Path) -> dict:
    bare = accelerator.unwrap_model(model)
    bare.eval()
    try:
        metrics = {k: float(v) for k, v in dict(evaluate(bare)).items()}
    finally:
        bare.train()
    record = {f"eval/{k}": v for k, v in metrics.items()}
    if is_better is not None and (state.best_metrics is None or is_better(metrics, state.best_metrics)):
        state.best_metrics, state.best_step = metrics, state.step
        record["eval/is_best"] = 1.0
        if on_best is not None and accelerator.is_main_process:
            on_best(bare, metrics)
    _log_metrics(accelerator, run_dir, state.step, record)
    log.info("step %d evaluation: %s", state.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _save_state(accelerator, run_dir: Path, state: _LoopState, keep_last: int) -> Path:
    """``save_state`` into ``state/step_N.tmp``, then rename: a kill never leaves a half state."""
    root = run_dir / STATE_DIR
    final = root / f"step_{state.step:07d}"
    partial = root / f"step_{state.step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    wait_for_everyone(accelerator)
    accelerator.save_state(str(partial), safe_serialization=True)
    wait_for_everyone(accelerator)
    if accelerator.is_main_process:
        (partial / TRAINER_STATE_FILE).write_text(json.dumps(state.to_json(), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        finished = sorted(d for d in root.iterdir() if _STEP_DIR.match(d.name))
        for old in finished[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone(accelerator)
    return final


def _progress(accelerator, total: int, initial: int, unit: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor):
                return int(item.shape[0])
    return 0


def _metric(metrics: Mapping[str, float], key: str) -> float:
    if key not in metrics:
        raise ConfigError(f"evaluation has no metric '{key}' (has: {', '.join(metrics)})")
    return float(metrics[key])


def _flat_config(cfg: TrainConfig) -> dict:
    from medtune.config import to_dict

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_dict(cfg))
    return flat


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
