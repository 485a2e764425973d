"""Finetuning: slice-wise volumetric segmentation (Med-Tuning, LoRA, ...), metrics,
whole-volume inference; referring segmentation and VQA live beside it.

Python API::

    from medtune.finetune import load_segmenter
    model = load_segmenter("checkpoints/medtuning")      # run folder or any export
    labels = model.predict_volume(volume.image)            # (M, H, W, D) -> (H, W, D) uint8

Names are imported on first use so that ``import medtune.finetune.<module>`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SliceSegmenter": "medtune.finetune.segmentation",
    "build_segmenter": "medtune.finetune.segmentation",
    "finetune_segmentation": "medtune.finetune.segmentation",
    "trained_state_dict": "medtune.finetune.segmentation",
    "validate_segmenter": "medtune.finetune.segmentation",
    "slices_to_volume": "medtune.finetune.segmentation",
    "volume_to_slices": "medtune.finetune.segmentation",
    "FinetuneConfig": "medtune.finetune.config",
    "SegmentationModelConfig": "medtune.finetune.config",
    "ValidationConfig": "medtune.finetune.config",
    "load_segmenter": "medtune.checkpoints.export",
    "export_run": "medtune.checkpoints.export",
    "evaluate_case": "medtune.finetune.metrics",
    "dice_scores": "medtune.finetune.metrics",
    "hd95_scores": "medtune.finetune.metrics",
    "sliding_window_probs": "medtune.finetune.inference",
    "predict_label_map": "medtune.finetune.inference",
    "write_label_map": "medtune.finetune.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medtune.finetune' has no attribute '{name}'")
