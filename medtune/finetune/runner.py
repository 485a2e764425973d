"""``finetune(task, cfg)``: the one way any task trains, on one process or many.

In order, the same for every task:

1. the run folder: ``--output`` or ``checkpoints/<config stem>-<time>``, decided on
   rank 0 and shared; refused when it holds a run and ``--resume`` is not given;
2. the data: :meth:`Task.build_data` on rank 0 first (it fills caches and resolves
   values left to the data), then on the other ranks; an error on rank 0 ends every rank;
3. the model: :meth:`Task.build_model` (pretrained weights unless resuming);
4. ``config.json`` (the task, the config, the derived facts), the task's other run files
   (:attr:`TaskData.files`, e.g. ``splits_final.json``) and, for adapter methods,
   ``backbone.safetensors`` (the base) when the run starts;
5. :func:`medtune.trainer.train` with :meth:`Task.evaluate` every ``train.eval_every``
   steps and at the end, ``best/`` on each new best of :meth:`Task.best_metric_of`;
6. the final weights (:func:`medtune.finetune.weights.save_trained`) and ``summary.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medtune import distributed
from medtune.checkpoints.runs import BEST_DIR, RunConfig, open_run, write_run_config, write_run_files, write_summary
from medtune.finetune.base import Task, TaskData
from medtune.finetune.weights import save_base_backbone, save_trained

log = logging.getLogger(__name__)


def finetune(task: Task, cfg: Any, *, output: str | Path | None = None, resume: str | Path | None = None,
             stem: str | None = None):
    """Train ``cfg`` (the task's config) into a run folder; returns the :class:`TrainResult`
    (the same on every process; ``result.run_dir`` is the folder).

    Args:
        output: the run folder (default ``checkpoints/<stem>-<YYYYmmdd-HHMMSS>``).
        resume: ``"latest"`` or a run / ``state/step_N`` folder to continue.
        stem: default run-folder prefix (the config file's stem; default the task name).
    """
    processes = distributed.processes()
    if not processes.is_main_process:  # one copy of the logs, from the main process
        logging.getLogger().setLevel(logging.WARNING)
    from medtune.config import to_dict

    with open_run(processes, output, stem or task.name, resume, RunConfig(task.name, to_dict(cfg))) as run_dir:
        return _finetune_in(task, cfg, run_dir, resume, processes)


def _finetune_in(task: Task, cfg: Any, run_dir: Path, resume: str | Path | None, processes: Any):
    from accelerate.utils import set_seed

    from medtune.config import to_dict
    from medtune.trainer import build_loader, higher_is_better, make_accelerator, train

    accelerator = make_accelerator(cfg.train, run_dir)
    main = accelerator.is_main_process

    data: TaskData = distributed.main_first(
        accelerator, lambda: task.build_data(cfg, run_dir), per_node=not cfg.train.shared_filesystem
    )
    run_config = RunConfig(task.name, to_dict(cfg), data.derived)  # build_data may resolve values of cfg
    set_seed(cfg.train.seed)  # the same initial weights on every process and every rerun
    model = task.build_model(cfg, data.derived, pretrained=resume is None)
    if main and resume is None:
        write_run_config(run_dir, run_config)
        write_run_files(run_dir, data.files)
        save_base_backbone(model, run_dir, metadata={"task": task.name})  # a resumed run keeps its base

    def evaluate(trained) -> dict[str, float]:
        return task.evaluate(trained, data, cfg, accelerator)

    def on_best(trained, metrics, step, weights) -> None:
        save_trained(trained, run_dir / BEST_DIR, run_dir, task.name, weights)
        write_summary(run_dir / BEST_DIR, {"step": step, "metrics": dict(metrics)})

    def on_start() -> None:  # a resumed run's config.json changes only once its state has loaded
        if resume is not None:
            write_run_config(run_dir, run_config)
            write_run_files(run_dir, data.files)

    key = task.best_metric_of(cfg) if data.eval is not None else None
    loader = build_loader(data.train, cfg.train, num_workers=data.num_workers)
    result = train(
        model, loader, cfg.train, run_dir, resume=resume,
        evaluate=evaluate if data.eval is not None else None,
        is_better=higher_is_better(key) if key is not None else None,
        on_best=on_best if key is not None else None, on_start=on_start,
        accelerator=accelerator, unit=task.unit,
    )
    if main:
        save_trained(model, run_dir, run_dir, task.name, result.state_dict)
        write_summary(run_dir, {
            "task": task.name, "steps": result.step, "final": result.eval_metrics,
            "best": result.best_metrics, "best_step": result.best_step, **task.summary_extras(cfg, data),
        })
        best = f"; best {key} {result.best_metrics} at step {result.best_step}" if result.best_metrics else ""
        log.info("%s finetuning finished after %d steps in %s%s", task.name, result.step, run_dir, best)
    distributed.barrier(accelerator)
    return result


__all__ = ["finetune"]
