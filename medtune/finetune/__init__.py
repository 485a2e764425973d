"""Finetuning tasks: segmentation, segment3d, referring segmentation, VQA, dynamic inference; one interface, one registry.

A task is one folder here plus one registry line below (see :mod:`medtune.finetune.base`
for the interface and a toy task). ``medtune finetune``, ``predict``, ``evaluate`` and
``export`` find tasks only through :data:`TASKS`.

Python API::

    from medtune.finetune import finetune, get_task, load_trained
    result = finetune(get_task("segmentation"), cfg, output="checkpoints/run")
    loaded = load_trained("checkpoints/run")          # any task's run folder or export
    from medtune.finetune import load_segmenter        # segmentation, ready for predict_volume

Names other than the registry are imported on first use.
"""

from __future__ import annotations

import importlib

from medtune.finetune.base import TASKS, Loaded, Task, TaskData, get_task

TASKS.register_path("segmentation", "medtune.finetune.segmentation.task:TASK")
TASKS.register_path("segment3d", "medtune.finetune.segment3d.task:TASK")
TASKS.register_path("referring", "medtune.finetune.referring.task:TASK")
TASKS.register_path("vqa", "medtune.finetune.vqa.task:TASK")
TASKS.register_path("dynamic", "medtune.finetune.dynamic.task:TASK")

_EXPORTS = {
    "finetune": "medtune.finetune.runner",
    "load_trained": "medtune.finetune.weights",
    "load_segmenter": "medtune.finetune.segmentation",
    "SliceSegmenter": "medtune.finetune.segmentation",
    "SegmentationConfig": "medtune.finetune.segmentation",
}

__all__ = sorted(["TASKS", "Loaded", "Task", "TaskData", "get_task", *_EXPORTS])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medtune.finetune' has no attribute '{name}'")
