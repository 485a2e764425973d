"""The one training loop (see :mod:`medtune.trainer` for what it does)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medtune.checkpoints.runs import (
    METRICS_FILE,
    TRAINER_STATE_FILE,
    is_step_dir,
    resolve_resume,
    state_root,
    step_dir_name,
)
from medtune.distributed import barrier
from medtune.errors import CheckpointError, ConfigError, DataError, MedtuneError
from medtune.trainer.config import TrainConfig, TrainResult
from medtune.trainer.engines import engine_for
from medtune.trainer.setup import (
    BackboneAnchor,
    _loss_of,
    build_loader,
    build_optimizer,
    freeze_backbone_groups,
    group_lr_factors,
    layer_decay_groups,
    make_accelerator,
    split_lr_groups,
    tune_host_allocator,
)

log = logging.getLogger(__name__)


def train(
    model: nn.Module,
    train_loader: DataLoader | Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: str | Path | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    is_better: Callable[[Mapping[str, float], Mapping[str, float]], bool] | None = None,
    on_best: Callable[[nn.Module, Mapping[str, float], int, dict], None] | None = None,
    on_start: Callable[[], None] | None = None,
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
        on_best: ``on_best(model, metrics, step, weights)`` on the main process whenever a
            new best evaluation is found (e.g. to save them): ``weights`` is the full state
            dict, gathered from the shards when the model is sharded.
        on_start: ``on_start()`` on the main process once a resumed state has loaded
            (or at once for a fresh run), before the first step: e.g. to write the run's
            config only when the state it describes is known to load.
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

    if cfg.tune_host_allocator:
        tune_host_allocator()
    engine = engine_for(accelerator, model)
    if cfg.compile:  # in place, before any wrapper: the weights keep their names
        from torch._inductor import config as inductor_config

        # random ops (masks, dropout) draw from eager's generator: a compiled run draws
        # the masks an eager run draws, and resumes exactly
        inductor_config.fallback_random = True
        model.compile(mode=cfg.compile_mode)
        log.info("compiling the model with torch.compile (mode %s) on its first steps", cfg.compile_mode)
    if not engine.sharded:
        _use_sync_batchnorm(accelerator, model)
    lr_groups = model.lr_groups() if callable(getattr(model, "lr_groups", None)) else []
    if cfg.optim.layer_decay is not None and cfg.optim.layer_decay < 1.0:
        decayed = layer_decay_groups(model, cfg.optim.layer_decay)
        lr_groups = [*lr_groups, *decayed]  # the model's own groups match first
        log.info("layer-wise lr decay %g: %d backbone layer groups, from %.3g x the lr (stem) to %g x",
                 cfg.optim.layer_decay, len(decayed), min(g.scale for g in decayed), max(g.scale for g in decayed))
    if cfg.optim.freeze_backbone_steps:
        if cfg.optim.freeze_backbone_steps >= cfg.max_steps:
            raise ConfigError(f"optim.freeze_backbone_steps {cfg.optim.freeze_backbone_steps} leaves none of the "
                              f"{cfg.max_steps} steps (train.max_steps) to the backbone")
        lr_groups = freeze_backbone_groups(model, cfg.optim.freeze_backbone_steps, lr_groups)
        log.info("the backbone stays at lr 0 for the first %d steps, then trains on a restarted schedule",
                 cfg.optim.freeze_backbone_steps)
    if lr_groups and engine.sharded:
        raise ConfigError(f"{type(model).__name__} trains parts at their own learning rates, which the "
                          f"{engine.kind} engine does not support; train it with DDP (one or more processes)")
    anchor = None
    if cfg.optim.anchor_decay:
        if engine.sharded:
            raise ConfigError(f"optim.anchor_decay: the {engine.kind} engine shards the weights it would pull; "
                              "train with DDP (one or more processes)")
        anchor = BackboneAnchor(model, cfg.optim.anchor_decay)
        log.info("L2-SP: %d backbone tensors pulled back to their starting weights at lr x %g per step",
                 len(anchor.anchors), cfg.optim.anchor_decay)
    param_groups: list = []

    def make_optimizer(params):
        param_groups[:] = split_lr_groups(model, params, lr_groups) if lr_groups else [params]
        return build_optimizer(param_groups if lr_groups else params, cfg.optim)

    model, optimizer, loader, scheduler = engine.prepare(
        accelerator, model, make_optimizer, train_loader,
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, group_lr_factors(param_groups, cfg.max_steps, cfg.schedule)),
    )
    batches_per_epoch = len(loader)

    state = _LoopState()
    if resume is not None:
        state_dir = resolve_resume(resume, run_dir)
        try:
            engine.load(accelerator, model, optimizer, state_dir)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:  # a state of another model or run
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"cannot resume from {state_dir}: {first}") from None
        state = _LoopState.from_json(state_dir / TRAINER_STATE_FILE)
        log.info("resumed from %s at step %d", state_dir, state.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run_dir / METRICS_FILE, state.step)
        if on_start is not None:
            on_start()
        if accelerator.log_with:
            accelerator.init_trackers(run_dir.name, config=_flat_config(cfg))

    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    log.info(
        "training %d steps of %d %s (%d per process x %d accumulated x %d processes), %s precision",
        cfg.max_steps, global_batch, unit, cfg.batch_size, cfg.grad_accum,
        accelerator.num_processes, accelerator.mixed_precision,
    )
    batches = _batch_stream(loader, batches_per_epoch, state.step * cfg.grad_accum, accelerator.num_processes)
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
            with accelerator.accumulate(model), _compile_errors(cfg.compile):
                out = model(batch)
                loss = _loss_of(out)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if cfg.grad_clip is not None:
                        grad_norm = engine.clip_grad_norm(accelerator, model, cfg.grad_clip)
                        _add(sums, counts, "grad_norm", grad_norm)
                    optimizer.step()
                    if anchor is not None and not accelerator.optimizer_step_was_skipped:
                        anchor.pull(optimizer)
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
        evaluating = evaluate is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or is_last)
        saving = cfg.save_every and (state.step % cfg.save_every == 0 or is_last)
        if evaluating or saving or is_last:
            _average_batchnorm_statistics(accelerator, model)
        if evaluating:
            result.eval_metrics = _run_evaluation(accelerator, engine, model, evaluate, is_better, on_best, state,
                                                  run_dir)
        if saving:
            result.state_dir = _save_state(accelerator, engine, model, optimizer, run_dir, state, cfg.keep_last,
                                           cfg.shared_filesystem)
    progress.close()

    result.state_dict = engine.full_state_dict(accelerator, model)  # every process takes part
    result.sharded = engine.sharded
    barrier(accelerator)
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


@contextlib.contextmanager
def _compile_errors(compiling: bool) -> Iterator[None]:
    """A model torch.compile cannot handle: one line naming ``train.compile``."""
    if not compiling:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    try:
        yield
    except (TorchDynamoException, InductorError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"train.compile: torch.compile cannot compile this model ({first}); "
                          "set train.compile: false") from None


def _batch_stream(loader, batches_per_epoch: int, consumed: int, processes: int = 1) -> Iterator[Any]:
    """Batches from micro-batch number ``consumed`` on, epoch after epoch, reproducibly."""
    from accelerate import skip_first_batches

    epoch, skip = divmod(consumed, batches_per_epoch)
    while True:
        loader.set_epoch(epoch)  # the seedable sampler shuffles with seed + epoch
        if hasattr(loader.dataset, "set_epoch"):  # e.g. crop positions; Accelerate skips it when sharded
            loader.dataset.set_epoch(epoch)
        if skip and hasattr(loader.dataset, "skip_items"):
            # a stream (medtune.data.stream) starts mid-epoch without reading what it skips;
            # Accelerate dispatches its batches: each micro-batch is one batch per process
            loader.dataset.skip_items(skip * loader.batch_size * processes)
            source = loader
        else:
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
    """Drop lines logged after ``step`` by a run that was killed before its next save, and
    a line torn by the kill (written in part), with a warning."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s: dropping line %d, written in part when the run stopped: %.60s", path, number, line)
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _use_sync_batchnorm(accelerator, model: nn.Module) -> None:
    """Several GPU processes: BatchNorm normalises with the statistics of the whole global
    batch (SyncBatchNorm, as FreMIM's official training), in place. CPU process groups
    cannot (torch's SyncBatchNorm is GPU-only); there the running statistics are
    averaged over the processes instead (:func:`_average_batchnorm_statistics`)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.MULTI_GPU and _batchnorms(model):
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:  # only when the model itself is a BatchNorm
            raise ConfigError("train(): the model is a bare BatchNorm layer; wrap it in a module")
        log.info("BatchNorm layers synchronised across %d processes (SyncBatchNorm)", accelerator.num_processes)


def _average_batchnorm_statistics(accelerator, model: nn.Module) -> None:
    """Average BatchNorm running statistics over the processes (every process calls this),
    so that evaluations and saved states are the same on every rank. DDP broadcasts rank
    0's buffers at each forward, so without this the ranks differ by their last batch."""
    if accelerator.num_processes == 1:
        return
    buffers = [b for m in _batchnorms(model) for b in (m.running_mean, m.running_var) if b is not None]
    if not buffers:
        return
    flat = torch.cat([b.detach().float().flatten() for b in buffers]).to(accelerator.device)
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    with torch.no_grad():
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()


def _run_evaluation(accelerator, engine, model, evaluate, is_better, on_best, state: _LoopState,
                    run_dir: Path) -> dict:
    with engine.whole(accelerator, model) as bare:
        bare.eval()
        try:
            metrics = {k: float(v) for k, v in dict(evaluate(bare)).items()}
        finally:
            bare.train()
    record = {f"eval/{k}": v for k, v in metrics.items()}
    if is_better is not None and (state.best_metrics is None or is_better(metrics, state.best_metrics)):
        state.best_metrics, state.best_step = metrics, state.step
        record["eval/is_best"] = 1.0
        if on_best is not None:
            weights = engine.full_state_dict(accelerator, model)  # every process takes part
            if accelerator.is_main_process:
                on_best(accelerator.unwrap_model(model), metrics, state.step, weights)
    _log_metrics(accelerator, run_dir, state.step, record)
    log.info("step %d evaluation: %s", state.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _save_state(accelerator, engine, model, optimizer, run_dir: Path, state: _LoopState, keep_last: int,
                shared_filesystem: bool = True) -> Path:
    """``save_state`` into ``state/step_N.tmp``, then rename: a kill never leaves a half state."""
    root = state_root(run_dir)
    final = root / step_dir_name(state.step)
    partial = root / f"{step_dir_name(state.step)}.tmp"
    # the process that writes this disk: the main one, or each node's first (node-local disks)
    writer = accelerator.is_main_process if shared_filesystem else accelerator.is_local_main_process
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(accelerator)
    engine.save(accelerator, model, optimizer, partial)
    barrier(accelerator)
    if writer:
        (partial / TRAINER_STATE_FILE).write_text(json.dumps(state.to_json(), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        finished = sorted(d for d in root.iterdir() if is_step_dir(d))
        for old in finished[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(accelerator)
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
