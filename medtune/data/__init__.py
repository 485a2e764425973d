"""Medical volumes in, tensors out: readers, preprocessing, cache, datasets, synthetic data.

Typical use::

    cases = find_cases("data/BraTS2020", layout="auto")
    cache = VolumeCache(cases, "checkpoints/.cache/brats2020")   # RAS, z-scored, cropped
    slices = SliceDataset(cache, img_size=128)      # {"image": (4, 128, 128), "foreground": ...}

    data = build_labeled_data(DataConfig(root="data/Task03_Liver", mode="3d"))  # a fold, planned
    data.plan     # DataPlan: orientation, target spacing, CT statistics (what prediction repeats)

Names are imported on first use, so that ``medtune data synth`` and ``check`` do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AugmentConfig": "augment",
    "Augmenter": "augment",
    "CachedVolume": "cache",
    "Preparation": "cache",
    "VolumeCache": "cache",
    "prepare_case": "cache",
    "ChunkedArray": "chunked",
    "write_chunked": "chunked",
    "CaseReader": "stream",
    "StreamingDataset": "stream",
    "stream_order": "stream",
    "BRATS_MODALITIES": "cases",
    "Case": "cases",
    "detect_layout": "cases",
    "find_cases": "cases",
    "scan_cases": "cases",
    "resolve_modalities": "cases",
    "canonical_modality": "cases",
    "check_dataset": "check",
    "inspect_dataset": "check",
    "DataConfig": "config",
    "LabeledData": "config",
    "build_labeled_data": "config",
    "build_labeled_dataset": "config",
    "build_pretrain_data": "config",
    "build_pretrain_dataset": "config",
    "build_pretrain_holdout": "config",
    "label_spec_for": "config",
    "resolve_cache_dir": "config",
    "CaseGrid": "geometry",
    "Grid": "geometry",
    "canonical_axcodes": "geometry",
    "plan_spacing": "geometry",
    "to_input_grid": "geometry",
    "to_training_grid": "geometry",
    "input_cases": "inputs",
    "label_files": "inputs",
    "Normalizer": "intensity",
    "channel_schemes": "intensity",
    "DataPlan": "plan",
    "kfold_splits": "splits",
    "read_splits": "splits",
    "split_cases": "splits",
    "CropDataset": "datasets",
    "SliceDataset": "datasets",
    "VolumeDataset": "datasets",
    "read_window": "datasets",
    "LabelSpec": "labels",
    "brats_regions": "labels",
    "crop_foreground": "preprocess",
    "crop_to_bbox": "preprocess",
    "foreground_mask": "preprocess",
    "nonzero_bbox": "preprocess",
    "pad_to_multiple": "preprocess",
    "paste_from_bbox": "preprocess",
    "preprocess": "preprocess",
    "zscore_nonzero": "preprocess",
    "synthesize_brats": "synth",
    "synthesize_ct": "synth",
    "synthesize_referring": "synth",
    "synthesize_vqa": "synth",
    "write_synthetic": "synth",
    "Volume": "volume",
    "load_case": "volume",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'medtune.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"medtune.data.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
