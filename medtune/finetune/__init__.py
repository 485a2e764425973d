"""Finetuning: slice-wise volumetric segmentation (Med-Tuning, LoRA, ...), metrics,
whole-volume inference; referring segmentation and VQA live beside it."""

from medtune.finetune.segmentation import SliceSegmenter, slices_to_volume, volume_to_slices

__all__ = ["SliceSegmenter", "slices_to_volume", "volume_to_slices"]
