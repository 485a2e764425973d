"""The task interface: what a downstream task gives medtune, and the registry of tasks.

A task (segmentation, referring segmentation, VQA, ...) is one folder under
``medtune/finetune/`` holding a :class:`Task` subclass, plus one line in
``medtune/finetune/__init__.py`` that registers it in :data:`TASKS`. Everything else is
shared: ``medtune finetune`` trains any task through :func:`medtune.finetune.runner.finetune`
(run folder, processes, data built rank 0 first, the one training loop, evaluation
split over processes, best checkpoint, summary), ``medtune predict``/``evaluate``/``export``
load a trained task model through :func:`medtune.finetune.weights.load_trained`, and
pick the task from the run folder's ``config.json``.

The smallest task::

    @dataclass
    class ToyConfig:
        data: ToyData = field(default_factory=ToyData)     # every task config has data.root
        train: TrainConfig = field(default_factory=TrainConfig)

    class ToyTask(Task):
        name, config_class, best_metric = "toy", ToyConfig, "accuracy"

        def build_data(self, cfg, run_dir):       # rank 0 first, then the others
            return TaskData(train=..., eval=..., derived={"classes": 3})
        def build_model(self, cfg, derived, pretrained=True):
            return ToyModel(derived["classes"])    # model(batch) -> {"loss": ..., ...}
        def evaluate(self, model, data, cfg, processes):
            return {"accuracy": ...}
        def predict(self, loaded, args):           # `medtune predict --model RUN ...`
            ...

    TASKS.register("toy")(ToyTask())
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn
from torch.utils.data import Dataset

from medtune.errors import ConfigError
from medtune.registry import Registry


@dataclass
class TaskData:
    """What :meth:`Task.build_data` returns.

    Attributes:
        train: training samples; ``model(default_collate(samples))`` is a training step.
        eval: whatever :meth:`Task.evaluate` reads (None: the run is not evaluated).
        derived: facts read from the data that the trained model depends on (label
            values, the answer vocabulary, the resolved channel order, ...). They are
            recorded in ``config.json`` and handed back to :meth:`Task.build_model`.
        num_workers: DataLoader workers (None: ``train.num_workers``, else 0).
        files: JSON files the run folder gets beside ``config.json`` (name -> content;
            names from :mod:`medtune.checkpoints.runs`), e.g. the split it trained on.
    """

    train: Dataset
    eval: Any = None
    derived: dict[str, Any] = field(default_factory=dict)
    num_workers: int | None = None
    files: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loaded:
    """A trained task model read back from a run or export folder (:func:`load_trained`)."""

    task: "Task"
    model: nn.Module  # in eval mode, on the requested device
    config: Any  # the task's config dataclass
    derived: dict[str, Any]  # TaskData.derived of the run
    folder: Path  # the run or export folder
    weights: Path  # the weight file read (model.safetensors, or adapter.safetensors + base + head)
    base_weights: Path | None = None  # the base backbone file an adapter was applied to


class Task:
    """One downstream task. Subclasses set the class attributes and the training hooks;
    every other hook has a default that fits most tasks.

    The trainer's contract holds for the model :meth:`build_model` returns:
    ``model(batch)`` returns ``{"loss": scalar tensor, **scalar logs}`` (the training
    step), and ``model.state_dict()`` is everything a trained model needs besides its
    config. A model with an adapted ``backbone`` attribute (``medtune.adapters``) gets
    adapter files and ``--format adapter`` exports for free.
    """

    name: str = ""
    """The registry name (``task:`` in YAML, ``--task``, ``config.json``)."""
    config_class: type = object
    """The run's config dataclass; it has ``train: TrainConfig`` and ``data`` with ``root``."""
    best_metric: str | None = None
    """The evaluation key whose maximum picks ``best/`` (see :meth:`best_metric_of`)."""
    unit: str = "samples"
    """What one training sample is called in the progress bar."""
    description: str = ""
    """One line for ``--help``."""
    predicts_in_parts: bool = False
    """Whether ``medtune predict`` can split its inputs over processes (``--num-parts``,
    ``accelerate launch``): each part writes its own files (``args.part_id`` of
    ``args.num_parts``)."""

    # ------------------------------------------------------------------ command line

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task flags of ``medtune finetune`` (besides --config/--data/--output/--set/--resume)."""

    def finetune_overrides(self, args: argparse.Namespace, raw: dict) -> list[str]:
        """``KEY=VALUE`` overrides that the task's flags stand for (applied before ``--set``,
        so an explicit ``--set`` of the same key wins). ``raw`` is the YAML mapping."""
        return []

    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task flags of ``medtune predict`` (besides --model/--input/--output/--checkpoint/--device)."""

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task flags of ``medtune evaluate`` (besides --pred/--gt)."""

    # ------------------------------------------------------------------ config

    def load_config(self, raw: Mapping[str, Any]) -> Any:
        """The config dataclass of a raw mapping (strict keys)."""
        from medtune.config import from_dict

        return from_dict(self.config_class, dict(raw))

    def read_config(self, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
        """A YAML recipe of this task (its ``task:`` key, if any, must name it) with
        ``KEY=VALUE`` overrides applied in order; errors name the file."""
        from medtune.config import apply_overrides, read_yaml

        raw = read_yaml(path) if path is not None else {}
        named = raw.pop("task", self.name)
        where = f"{path}: " if path is not None else ""
        if named != self.name:
            raise ConfigError(f"{where}a recipe of task '{named}', not '{self.name}'")
        try:
            apply_overrides(raw, list(overrides))
            return self.load_config(raw)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None

    def best_metric_of(self, cfg: Any) -> str | None:
        """The evaluation key that picks ``best/`` (higher is better) for this run."""
        return self.best_metric

    # ------------------------------------------------------------------ training

    def build_data(self, cfg: Any, run_dir: Path) -> TaskData:
        """Datasets of the run (called on rank 0 first, then on the others). May fill in
        values of ``cfg`` that were left to the data (then saved in config.json)."""
        raise NotImplementedError(f"task '{self.name}' has no build_data")

    def build_model(self, cfg: Any, derived: Mapping[str, Any], pretrained: bool = True) -> nn.Module:
        """The model; ``pretrained=False`` skips loading pretrained weights (they come
        from a checkpoint anyway)."""
        raise NotImplementedError(f"task '{self.name}' has no build_model")

    def evaluate(self, model: nn.Module, data: TaskData, cfg: Any, processes: Any) -> dict[str, float]:
        """Metrics of ``model`` on ``data.eval``; called on every process, which should
        split the work (:func:`medtune.distributed.split_gather`)."""
        raise NotImplementedError(f"task '{self.name}' has no evaluate")

    def summary_extras(self, cfg: Any, data: TaskData) -> dict[str, Any]:
        """Extra entries of the run's ``summary.json`` (e.g. a baseline's score)."""
        return {}

    # ------------------------------------------------------------------ using a trained model

    def predict(self, loaded: Loaded, args: argparse.Namespace) -> int:
        """``medtune predict --model RUN ...``: returns the exit code."""
        raise ConfigError(f"task '{self.name}' has no prediction")

    def predict_ensemble(self, loaded: Sequence[Loaded], args: argparse.Namespace) -> int:
        """``medtune predict --model RUN1 RUN2 ...``: one prediction from several runs."""
        raise ConfigError(f"task '{self.name}' does not ensemble runs; give one --model")

    def score(self, args: argparse.Namespace) -> int:
        """``medtune evaluate``: score predictions against ground truth; returns the exit code."""
        raise ConfigError(f"task '{self.name}' has no 'medtune evaluate' (its predict reports metrics)")

    def export_formats(self, loaded: Loaded) -> tuple[str, ...]:
        """Export formats of this task's own (besides full / adapter / merged)."""
        return ()

    def export(self, loaded: Loaded, out_dir: Path, fmt: str) -> Path:
        """Write one of :meth:`export_formats` into ``out_dir``."""
        raise ConfigError(f"task '{self.name}' cannot export '{fmt}'")


TASKS: Registry[Task] = Registry("task")
"""Every task by name. Registered in ``medtune/finetune/__init__.py``, one line each."""


def get_task(name: str) -> Task:
    """The registered task ``name`` (a :class:`ConfigError` lists the known ones).

    (Importing this module runs ``medtune/finetune/__init__.py`` first, whose lines
    register every task.)
    """
    return TASKS.get(name)


__all__ = ["Loaded", "TASKS", "Task", "TaskData", "get_task"]
