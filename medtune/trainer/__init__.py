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

from medtune.trainer.config import OptimConfig, ScheduleConfig, TrainConfig, TrainResult
from medtune.trainer.loop import train
from medtune.trainer.setup import (
    LrGroup,
    build_loader,
    build_optimizer,
    higher_is_better,
    lower_is_better,
    lr_factor,
    make_accelerator,
    resolve_mixed_precision,
    unused_parameters,
)

__all__ = [
    "LrGroup", "OptimConfig", "ScheduleConfig", "TrainConfig", "TrainResult", "build_loader", "build_optimizer",
    "higher_is_better", "lower_is_better", "lr_factor", "make_accelerator", "resolve_mixed_precision",
    "train", "unused_parameters",
]
