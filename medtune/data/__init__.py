"""Medical volumes in, tensors out: readers, preprocessing, cache, datasets, synthetic data.

Typical use::

    cases = find_cases("data/BraTS2020", layout="auto")
    cache = VolumeCache(cases, "checkpoints/.cache/brats2020")
    slices = SliceDataset(cache, img_size=128)      # {"image": (4, 128, 128), "foreground": ...}
"""

from medtune.data.cache import CachedVolume, VolumeCache
from medtune.data.cases import BRATS_MODALITIES, Case, detect_layout, find_cases, scan_cases
from medtune.data.check import check_dataset
from medtune.data.config import DataConfig, build_labeled_dataset, build_pretrain_dataset, split_cases
from medtune.data.datasets import CropDataset, SliceDataset, VolumeDataset, read_window
from medtune.data.labels import LabelSpec, brats_regions
from medtune.data.preprocess import (
    crop_foreground,
    crop_to_bbox,
    foreground_mask,
    nonzero_bbox,
    pad_to_multiple,
    paste_from_bbox,
    preprocess,
    zscore_nonzero,
)
from medtune.data.synth import synthesize_brats
from medtune.data.volume import Volume, load_case

__all__ = [
    "BRATS_MODALITIES",
    "Case",
    "CachedVolume",
    "CropDataset",
    "DataConfig",
    "LabelSpec",
    "SliceDataset",
    "Volume",
    "VolumeCache",
    "VolumeDataset",
    "brats_regions",
    "build_labeled_dataset",
    "build_pretrain_dataset",
    "check_dataset",
    "crop_foreground",
    "crop_to_bbox",
    "detect_layout",
    "find_cases",
    "foreground_mask",
    "load_case",
    "nonzero_bbox",
    "pad_to_multiple",
    "paste_from_bbox",
    "preprocess",
    "read_window",
    "scan_cases",
    "split_cases",
    "synthesize_brats",
    "zscore_nonzero",
]
