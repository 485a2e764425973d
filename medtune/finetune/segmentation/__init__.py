"""Slice-wise volumetric segmentation: a 2D backbone (+ adapters) and a decoder per slice.

Python API::

    from medtune.finetune.segmentation import load_segmenter
    model = load_segmenter("checkpoints/medtuning")      # run folder or any export
    labels = model.predict_volume(volume.image)            # (M, H, W, D) -> (H, W, D) uint8

Layout: ``config.py`` (the run config), ``model.py`` (:class:`SliceSegmenter`),
``metrics.py`` (Dice/HD95, BraTS rules), ``inference.py`` (sliding window, NIfTI
writing), ``evaluate.py`` (validation during training), ``predict.py``
(``medtune predict``), ``score.py`` (``medtune evaluate``), ``task.py`` (the task).
"""

from __future__ import annotations

from pathlib import Path

from medtune.finetune.segmentation.config import SegmentationConfig, SegmentationModelConfig, ValidationConfig
from medtune.finetune.segmentation.model import SliceSegmenter, VolumeSegmenter, build_segmenter


def load_segmenter(
    path: str | Path, *, which: str = "best", base_weights: str | Path | None = None, map_location="cpu"
) -> VolumeSegmenter:
    """A segmentation (or ``segment3d``) run folder or export (full, adapter, merged) as a
    model in eval mode, ready for :meth:`VolumeSegmenter.predict_volume` (``label_spec`` and
    ``roi_size`` set)."""
    from medtune.checkpoints.runs import read_run_config
    from medtune.errors import CheckpointError
    from medtune.finetune.base import get_task
    from medtune.finetune.segmentation.task import SegmentationTask
    from medtune.finetune.weights import load_trained

    task_name = read_run_config(path).task
    task = get_task(task_name)
    if not isinstance(task, SegmentationTask):
        raise CheckpointError(f"{path}: a '{task_name}' run, not a segmentation run")
    return load_trained(path, which, base_weights=base_weights, device=map_location, task=task).model


__all__ = [
    "SegmentationConfig", "SegmentationModelConfig", "SliceSegmenter", "ValidationConfig", "VolumeSegmenter",
    "build_segmenter", "load_segmenter",
]
