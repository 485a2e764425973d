"""The ``data:`` section of pretraining and finetuning run configs, and the datasets it builds.

::

    data:
      root: data/BraTS2020          # the CLI's --data fills it
      mode: 2d
      img_size: 128

``build_pretrain_dataset(cfg)`` gives unlabeled slices or crops;
``build_labeled_dataset(cfg, "train" | "val")`` gives labeled crops for training and
whole volumes for validation, split deterministically by case id.

Cache location: ``cache_dir`` if set; otherwise ``<run_dir>/../.cache/<dataset key>``,
i.e. a ``.cache/`` folder beside the run folders (``checkpoints/.cache/`` for the
default output folder), shared by every run on the same data. The key joins the
dataset folder's name with a hash of its absolute path, so two datasets never share
a cache folder. Without a run folder, ``checkpoints/.cache/<key>`` is used.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from medtune.data.cache import VolumeCache
from medtune.data.cases import LAYOUTS, Case, find_cases
from medtune.data.check import default_label_spec
from medtune.data.datasets import CropDataset, SliceDataset, VolumeDataset
from medtune.data.labels import LabelSpec
from medtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_CACHE_PARENT = Path("checkpoints") / ".cache"


@dataclass
class DataConfig:
    """Where the data is and how it is cut into training samples."""

    root: str | None = None
    """Dataset folder (BraTS folders, MSD or nnU-Net raw); the CLI's ``--data`` fills it."""
    layout: str = "auto"
    """``auto`` (detect), ``brats``, ``msd`` or ``nnunet``."""
    modalities: list[str] | None = None
    """Modality names in channel order; None: BraTS (flair, t1ce, t1, t2) or every
    channel of ``dataset.json``."""
    cache_dir: str | None = None
    """Folder of preprocessed ``.npy`` volumes; None: ``<run_dir>/../.cache/<dataset key>``."""
    mode: Literal["2d", "3d"] = "2d"
    """``2d``: slices (``img_size``); ``3d``: crops (``crop_size``)."""
    img_size: int = 128
    """Side of the square 2D slices (random crop, zero padding when smaller)."""
    slice_axis: int = -1
    """Spatial axis slices are cut along (-1: the last, axial for BraTS)."""
    crop_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    """3D crop size (h, w, d); smaller volumes are zero padded."""
    samples_per_volume: int = 1
    """3D crops drawn per case per epoch."""
    min_foreground: float = 0.0
    """2D: keep only slices with at least this fraction of foreground pixels."""
    foreground_oversample: float = 0.33
    """3D labeled: probability a crop is centred on a label > 0 voxel."""
    num_workers: int = 2
    """DataLoader worker processes."""
    label_values: list[int] | None = None
    """Label values in class order (BraTS 2023: [0, 1, 2, 3]); None: BraTS [0, 1, 2, 4]
    or the ``labels`` of ``dataset.json``."""
    val_fraction: float = 0.2
    """Fraction of labeled cases held out for validation (chosen by hashed case id)."""
    seed: int = 0
    """Seed of crop positions and nothing else (the split does not depend on it)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"data.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.mode not in ("2d", "3d"):
            raise ValueError(f"data.mode must be '2d' or '3d', got {self.mode!r}")
        if len(self.crop_size) != 3:
            raise ValueError(f"data.crop_size needs 3 sizes, got {self.crop_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.img_size < 1 or self.samples_per_volume < 1:
            raise ValueError("data.img_size and data.samples_per_volume must be >= 1")


def dataset_key(root: str | Path) -> str:
    """``<folder name>-<8 hex of its absolute path>``: a cache folder name per dataset."""
    path = Path(root).expanduser().resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{path.name}-{digest}"


def resolve_cache_dir(cfg: DataConfig, run_dir: str | Path | None = None) -> Path:
    """The cache folder for ``cfg`` (see the module docstring)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if cfg.root is None:
        raise ConfigError("data.root is not set (pass --data or set data.root)")
    parent = Path(run_dir).parent / ".cache" if run_dir is not None else DEFAULT_CACHE_PARENT
    return parent / dataset_key(cfg.root)


def label_spec_for(cfg: DataConfig) -> LabelSpec:
    """``cfg.label_values`` if set, else the dataset's default (BraTS or dataset.json)."""
    if cfg.label_values:
        try:
            return LabelSpec.from_values(cfg.label_values)
        except ValueError as exc:
            raise ConfigError(f"data.label_values: {exc}") from None
    return default_label_spec(_root(cfg), cfg.layout)


def _root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise ConfigError("data.root is not set (pass --data or set data.root)")
    return Path(cfg.root)


def split_cases(cases: list[Case], val_fraction: float) -> tuple[list[Case], list[Case]]:
    """Deterministic train/val split: cases ordered by a hash of their id, the first
    ``round(n * val_fraction)`` go to validation (at least one when ``val_fraction > 0``
    and there are two or more cases). Adding a case moves no other case across.
    """
    if val_fraction <= 0 or len(cases) < 2:
        return list(cases), []
    ranked = sorted(cases, key=lambda c: hashlib.sha1(c.case_id.encode()).hexdigest())
    n_val = min(max(1, int(len(cases) * val_fraction + 0.5)), len(cases) - 1)
    val_ids = {c.case_id for c in ranked[:n_val]}
    return [c for c in cases if c.case_id not in val_ids], [c for c in cases if c.case_id in val_ids]


def build_pretrain_dataset(
    cfg: DataConfig,
    run_dir: str | Path | None = None,
    show_progress: bool | None = None,
    split: Literal["train", "val", "all"] = "all",
) -> Dataset | None:
    """Unlabeled samples: :class:`SliceDataset` (2d) or :class:`CropDataset` (3d).

    ``split``: ``all`` cases, or the ``train``/``val`` cases of :func:`split_cases` with
    ``cfg.val_fraction`` (the same split as the labeled sets, so pretraining can hold
    out the cases finetuning validates on). None when ``val`` has no case.
    """
    cases = find_cases(_root(cfg), cfg.layout, cfg.modalities)
    if split not in ("train", "val", "all"):
        raise ConfigError(f"unknown split '{split}' (train, val, all)")
    if split != "all":
        cases = split_cases(cases, cfg.val_fraction)[0 if split == "train" else 1]
        if not cases:
            return None
    cache = VolumeCache(cases, resolve_cache_dir(cfg, run_dir), with_labels=False, show_progress=show_progress)
    if cfg.mode == "2d":
        return SliceDataset(cache, cfg.img_size, cfg.slice_axis, cfg.min_foreground, seed=cfg.seed)
    return CropDataset(cache, cfg.crop_size, cfg.samples_per_volume, foreground_oversample=0.0, seed=cfg.seed)


def build_labeled_dataset(
    cfg: DataConfig,
    split: Literal["train", "val", "all"] = "train",
    run_dir: str | Path | None = None,
    show_progress: bool | None = None,
) -> Dataset:
    """Labeled samples of one split.

    ``train``: slices (2d) or crops (3d) with ``"label"`` class indices. ``val`` and
    ``all``: whole cropped volumes (:class:`VolumeDataset`, batch size 1) with
    ``"case_index"`` so that ``dataset.cache.meta(i)`` gives the bbox to paste back.
    Raises :class:`~medtune.errors.DataError` for a case without a label or with
    label values outside the declared set, and for an empty validation split.
    """
    spec = label_spec_for(cfg)
    cases = find_cases(_root(cfg), cfg.layout, cfg.modalities, require_labels=True)
    train_cases, val_cases = split_cases(cases, cfg.val_fraction)
    chosen = {"train": train_cases, "val": val_cases, "all": cases}.get(split)
    if chosen is None:
        raise ConfigError(f"unknown split '{split}' (train, val, all)")
    if not chosen:
        raise DataError(
            f"split '{split}' of {cfg.root} is empty ({len(cases)} cases, val_fraction {cfg.val_fraction})"
        )
    cache = VolumeCache(chosen, resolve_cache_dir(cfg, run_dir), label_spec=spec, show_progress=show_progress)
    if split != "train":
        return VolumeDataset(cache, with_label=True, label_spec=spec)
    if cfg.mode == "2d":
        return SliceDataset(cache, cfg.img_size, cfg.slice_axis, cfg.min_foreground, True, spec, cfg.seed)
    return CropDataset(
        cache, cfg.crop_size, cfg.samples_per_volume, True, cfg.foreground_oversample, spec, cfg.seed
    )
