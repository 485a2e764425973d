"""The ``data:`` section of pretraining and finetuning run configs, and the datasets it builds.

::

    data:
      root: data/Task03_Liver       # the CLI's --data fills it
      layout: auto                  # --layout
      mode: 2d                      # 2d slices (img_size) or 3d crops (crop_size)
      slice_axis: axial             # the training grid puts this anatomical axis last
      spacing: auto                 # nnU-Net's median spacing; null: keep; or [0.8, 0.8, 2.5] mm
      normalization: auto           # CT channels: nnU-Net's CT scheme; others: z-score
      augment: {flip_prob: 0.5}     # data.augment (medtune.data.augment); null: none
      folds: 5                      # or split: splits_final.json; fold: which one (--fold)
      cache_format: npy             # or compressed: zstd chunks, about 3x smaller, more CPU per read
      stream: false                 # pretraining only: read cases lazily, no cache (stream_buffer)

:func:`build_pretrain_data` gives unlabeled slices or crops of every case;
:func:`build_labeled_data` gives labeled slices/crops of the training cases and whole
volumes of the validation cases of a fold (:mod:`.splits`). Both return the
:class:`DataPlan`: what the data decided (orientation, target spacing, intensity
statistics), which a run records so that prediction repeats it.

Cache location: ``cache_dir`` if set; otherwise ``<run_dir>/../.cache/<dataset key>``,
i.e. a ``.cache/`` folder beside the run folders (``checkpoints/.cache/`` for the
default output folder), shared by every run on the same data. The key joins the
dataset folder's name with a hash of its absolute path (and, when the training grid is
not the files' own, of the orientation and spacing), so two datasets never share a
cache folder. Without a run folder, ``checkpoints/.cache/<key>`` is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from medtune.data.augment import AugmentConfig, Augmenter
from medtune.data.cache import FORMATS, Preparation, VolumeCache
from medtune.data.cases import LAYOUTS, Case, find_cases, resolve_modalities
from medtune.data.check import default_label_spec
from medtune.data.datasets import CropDataset, SliceDataset, VolumeDataset
from medtune.data.geometry import slice_axis_name
from medtune.data.intensity import DEFAULT_BODY_THRESHOLD, NORMALIZATIONS, channel_schemes
from medtune.data.labels import LabelSpec
from medtune.data.plan import DataPlan, PreparedCase, fit_normalizer, plan_grid
from medtune.data.splits import plan_split, split_cases
from medtune.data.stream import CaseReader, StreamingDataset
from medtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_CACHE_PARENT = Path("checkpoints") / ".cache"


@dataclass
class DataConfig:
    """Where the data is, how it is brought to one grid and cut into training samples."""

    root: str | None = None
    """Dataset folder (BraTS folders, MSD or nnU-Net raw); the CLI's ``--data`` fills it."""
    layout: str = "auto"
    """``auto`` (detect), ``brats``, ``msd`` or ``nnunet`` (the CLI's ``--layout``)."""
    modalities: list[str] | None = None
    """Modality names in channel order; None: BraTS (flair, t1ce, t1, t2) or every
    channel of ``dataset.json`` (the CLI's ``--modalities``)."""
    cache_dir: str | None = None
    """Folder of preprocessed volumes; None: ``<run_dir>/../.cache/<dataset key>``."""
    cache_format: str = "npy"
    """``npy``: memory-mapped float32 ``.npy`` (fastest reads, largest); ``compressed``:
    zstd-compressed chunks, a slice or crop decompresses only the chunks it overlaps
    (:mod:`medtune.data.chunked`). Changing it rebuilds the cache."""
    stream: bool = False
    """Pretraining on data that does not fit the cache: no cache; each epoch reads every
    case once from its files, in a seeded order, and shuffles its samples in a buffer of
    ``stream_buffer`` (:mod:`medtune.data.stream`). An epoch is ``samples_per_volume``
    slices (2d) or crops (3d) per case; ``num_workers`` threads read cases ahead. Exact on
    resume. z-score/none normalisation only (CT statistics need every case up front)."""
    stream_buffer: int = 256
    """``stream``: samples held in memory for shuffling (a larger buffer mixes more cases)."""
    mode: Literal["2d", "3d"] = "2d"
    """``2d``: slices (``img_size``); ``3d``: crops (``crop_size``)."""
    img_size: int = 128
    """Side of the square 2D slices (random crop, zero padding when smaller)."""
    slice_axis: str | int = "axial"
    """Anatomical axis slices are cut along: ``axial``, ``coronal`` or ``sagittal``. Volumes
    are reoriented (RAS for axial) so that this axis is the last array axis; an int is an
    axis of the RAS array (0 sagittal, 1 coronal, 2 or -1 axial)."""
    spacing: str | list[float] | None = "auto"
    """Target voxel spacing in mm: ``auto`` (the dataset's median, with nnU-Net's rule for
    an anisotropic axis), explicit ``[x, y, z]`` (training-grid order), or null (keep
    each case's own voxels)."""
    normalization: str = "auto"
    """``auto`` (CT channels of dataset.json: nnU-Net's CT scheme; others: z-score over
    nonzero voxels), ``zscore``, ``ct`` or ``none`` (see :mod:`medtune.data.intensity`)."""
    body_threshold: float = DEFAULT_BODY_THRESHOLD
    """CT channels: voxels above this HU are body (the crop box, foreground masks, and the
    statistics of unlabeled data)."""
    crop_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    """3D crop size (h, w, d); smaller volumes are zero padded."""
    samples_per_volume: int = 1
    """3D crops drawn per case per epoch (with ``stream``: 2D slices too)."""
    min_foreground: float = 0.0
    """2D: keep only slices with at least this fraction of foreground pixels."""
    foreground_oversample: float = 0.33
    """3D labeled: probability a crop is centred on a label > 0 voxel."""
    num_workers: int = 2
    """DataLoader worker processes (where augmentation runs)."""
    label_values: list[int] | None = None
    """Label values in class order (BraTS 2023: [0, 1, 2, 3]); None: BraTS [0, 1, 2, 4]
    or the ``labels`` of ``dataset.json``."""
    val_fraction: float = 0.2
    """Fraction of labeled cases held out for validation (chosen by hashed case id)
    when neither ``folds`` nor ``split`` is set."""
    split: str | None = None
    """An nnU-Net ``splits_final.json`` (list of ``{"train": [...], "val": [...]}``); with ``fold``."""
    folds: int | None = None
    """A deterministic k-fold split of the labeled cases (written into the run folder); with ``fold``."""
    fold: int = 0
    """Which fold of ``split`` or ``folds`` trains (the CLI's ``--fold``)."""
    seed: int = 0
    """Seed of crop positions and augmentation (the split does not depend on it)."""
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    """Training-time augmentation (:class:`~medtune.data.augment.AugmentConfig`); null: none."""

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
        self.slice_axis = slice_axis_name(self.slice_axis)  # ValueError names the allowed values
        if isinstance(self.spacing, str) and self.spacing != "auto":
            raise ValueError(f"data.spacing must be auto, null or [x, y, z] mm, got {self.spacing!r}")
        if isinstance(self.spacing, (list, tuple)):
            if len(self.spacing) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in self.spacing):
                raise ValueError(f"data.spacing must be auto, null or three numbers in mm, got {self.spacing!r}")
            if not all(np.isfinite(s) and s > 0 for s in self.spacing):
                raise ValueError(f"data.spacing must be positive and finite, got {self.spacing!r}")
            self.spacing = [float(s) for s in self.spacing]
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if self.split is not None and self.folds is not None:
            raise ValueError("data.split and data.folds exclude each other (a split file has its own folds)")
        if self.fold < 0:
            raise ValueError(f"data.fold must be >= 0, got {self.fold}")
        if self.cache_format not in FORMATS:
            raise ValueError(f"data.cache_format must be one of {', '.join(FORMATS)}, got {self.cache_format!r}")
        if self.stream_buffer < 1:
            raise ValueError(f"data.stream_buffer must be >= 1, got {self.stream_buffer}")


def add_data_arguments(parser: argparse.ArgumentParser, *, folds: bool) -> None:
    """The ``data:`` flags every training command shares (``--data`` is added with the
    run flags); ``folds``: also ``--split``, ``--folds``, ``--fold`` (labeled data)."""
    parser.add_argument("--layout", default=None, choices=LAYOUTS,
                        help="dataset layout (sets data.layout; default: the config's, else auto-detected)")
    parser.add_argument("--modalities", nargs="+", default=None, metavar="NAME",
                        help="modality names in channel order (sets data.modalities; default: BraTS flair t1ce "
                        "t1 t2, or every channel of dataset.json)")
    if folds:
        parser.add_argument("--split", default=None, metavar="SPLITS_JSON",
                            help="an nnU-Net splits_final.json to take the folds from (sets data.split)")
        parser.add_argument("--folds", type=int, default=None, metavar="K",
                            help="a deterministic K-fold split of the labeled cases (sets data.folds)")
        parser.add_argument("--fold", type=int, default=None, metavar="K",
                            help="which fold of --split/--folds trains (sets data.fold; default 0)")


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``data.*=VALUE`` overrides for the flags of :func:`add_data_arguments` that were given."""
    overrides = []
    for flag, key in (("layout", "layout"), ("modalities", "modalities"), ("split", "split"), ("folds", "folds"),
                      ("fold", "fold")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"data.{key}={json.dumps(value)}")  # JSON: a YAML scalar or list as given
    return overrides


def dataset_key(root: str | Path) -> str:
    """``<folder name>-<8 hex of its absolute path>``: a cache folder name per dataset."""
    path = Path(root).expanduser().resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{path.name}-{digest}"


def resolve_cache_dir(cfg: DataConfig, run_dir: str | Path | None = None, grid: dict | None = None) -> Path:
    """The cache folder for ``cfg`` (see the module docstring). ``grid``: the training
    grid's orientation and spacing, when they are not the files' own (a key of their own)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if cfg.root is None:
        raise ConfigError("data.root is not set (pass --data or set data.root)")
    parent = Path(run_dir).parent / ".cache" if run_dir is not None else DEFAULT_CACHE_PARENT
    key = dataset_key(cfg.root)
    if grid:
        key += "-" + hashlib.sha1(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:6]
    return parent / key


def label_spec_for(cfg: DataConfig) -> LabelSpec:
    """``cfg.label_values`` if set, else the dataset's default (BraTS or dataset.json);
    BraTS regions only for BraTS data."""
    root = _root(cfg)
    if cfg.label_values:
        try:
            return LabelSpec.from_values(cfg.label_values, brats=_is_brats(root, cfg.layout))
        except ValueError as exc:
            raise ConfigError(f"data.label_values: {exc}") from None
    return default_label_spec(root, cfg.layout)


def _is_brats(root: Path, layout: str) -> bool:
    from medtune.data.cases import detect_layout

    return (detect_layout(root) if layout == "auto" else layout) == "brats"


def _root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise ConfigError("data.root is not set (pass --data or set data.root)")
    return Path(cfg.root)


def channel_names(cfg: DataConfig) -> list[str]:
    return list(cfg.modalities) if cfg.modalities is not None else resolve_modalities(_root(cfg), cfg.layout)


def _cache(cfg: DataConfig, cases: list[Case], run_dir, schemes, axcodes, spacing, show_progress,
           label_spec: LabelSpec | None = None, with_labels: bool = True) -> VolumeCache:
    own_grid = axcodes == "RAS" and spacing is None  # what a cache without a grid key holds
    grid_key = None if own_grid else {"axcodes": axcodes, "spacing": spacing}
    return VolumeCache(
        cases, resolve_cache_dir(cfg, run_dir, grid_key), label_spec=label_spec, with_labels=with_labels,
        show_progress=show_progress, axcodes=axcodes, spacing=spacing, schemes=schemes,
        body_threshold=cfg.body_threshold, cache_format=cfg.cache_format,
    )


def _augmenter(cfg: DataConfig) -> Augmenter | None:
    if cfg.augment is None:
        return None
    return Augmenter(cfg.augment, 2 if cfg.mode == "2d" else 3)


# --------------------------------------------------------------------------- building


def build_pretrain_data(
    cfg: DataConfig, run_dir: str | Path | None = None, show_progress: bool | None = None
) -> tuple[Dataset, DataPlan]:
    """Unlabeled samples of every case (:class:`SliceDataset` for 2d, :class:`CropDataset`
    for 3d, augmented by ``cfg.augment``) and the :class:`DataPlan`."""
    cases = find_cases(_root(cfg), cfg.layout, cfg.modalities)
    dataset, plan, _ = _pretrain_samples(cfg, cases, [], run_dir, show_progress)
    return dataset, plan


def build_pretrain_holdout(
    cfg: DataConfig, run_dir: str | Path | None = None, show_progress: bool | None = None
) -> tuple[Dataset, DataPlan, Dataset | None]:
    """Pretraining that holds out the fold's validation cases (:func:`~.splits.plan_split`,
    the cases finetuning validates on): the samples of the training cases, the
    :class:`DataPlan` fitted on them, and the held-out cases' samples (not augmented;
    None when the fold has no validation case, or with ``data.stream``)."""
    cases = find_cases(_root(cfg), cfg.layout, cfg.modalities)
    train_cases, val_cases, _ = plan_split(
        cases, val_fraction=cfg.val_fraction, split=cfg.split, folds=cfg.folds, fold=cfg.fold
    )
    if not train_cases:
        raise DataError(f"fold {cfg.fold} of {cfg.root} has no training cases ({len(cases)} cases)")
    return _pretrain_samples(cfg, train_cases, val_cases, run_dir, show_progress)


def _pretrain_samples(cfg: DataConfig, cases: list[Case], heldout_cases: list[Case], run_dir, show_progress):
    """Samples of ``cases``, the plan fitted on them, and samples of ``heldout_cases``
    (same grid and normalizer, no augmentation; None when there are none)."""
    schemes = channel_schemes(cfg.normalization, channel_names(cfg))
    axcodes, spacing = plan_grid(cfg.slice_axis, cfg.spacing, cases + heldout_cases)
    if cfg.stream:  # the held-out cases stay out of training; a stream does not measure them
        return (*_stream(cfg, cases, schemes, axcodes, spacing), None)
    cache = _cache(cfg, cases, run_dir, schemes, axcodes, spacing, show_progress, with_labels=False)
    normalizer = fit_normalizer(cache, schemes, labeled=False)
    plan = DataPlan(axcodes, spacing, normalizer, cfg.body_threshold)
    samples = []
    for chosen, part_cache, augment in ((cases, cache, _augmenter(cfg)), (heldout_cases, None, None)):
        if not chosen:
            samples.append(None)
            continue
        if part_cache is None:
            part_cache = _cache(cfg, chosen, run_dir, schemes, axcodes, spacing, show_progress, with_labels=False)
        if cfg.mode == "2d":
            samples.append(SliceDataset(part_cache, cfg.img_size, -1, cfg.min_foreground, seed=cfg.seed,
                                        normalizer=normalizer, augment=augment))
        else:
            samples.append(CropDataset(part_cache, cfg.crop_size, cfg.samples_per_volume, foreground_oversample=0.0,
                                       seed=cfg.seed, normalizer=normalizer, augment=augment))
    return samples[0], plan, samples[1]


def _stream(cfg: DataConfig, cases: list[Case], schemes, axcodes, spacing) -> tuple[Dataset, DataPlan]:
    """``data.stream``: the samples of :func:`build_pretrain_data`, read lazily."""
    if "ct" in schemes:
        raise ConfigError("data.stream: CT channels are normalised with statistics of every training case, "
                          "which a stream does not read up front; set data.stream: false or data.normalization")
    reader = CaseReader(cases, Preparation(True, True, axcodes, spacing, schemes, cfg.body_threshold, False))
    normalizer = fit_normalizer(reader, schemes, labeled=False)  # reads nothing without CT channels
    if cfg.mode == "2d":
        items: Dataset = SliceDataset(reader, cfg.img_size, -1, cfg.min_foreground, seed=cfg.seed,
                                      normalizer=normalizer, augment=_augmenter(cfg),
                                      slices_per_case=cfg.samples_per_volume)
    else:
        items = CropDataset(reader, cfg.crop_size, cfg.samples_per_volume, foreground_oversample=0.0,
                            seed=cfg.seed, normalizer=normalizer, augment=_augmenter(cfg))
    stream = StreamingDataset(items, cfg.samples_per_volume, cfg.stream_buffer, read_ahead=cfg.num_workers)
    return stream, DataPlan(axcodes, spacing, normalizer, cfg.body_threshold)


def build_pretrain_dataset(
    cfg: DataConfig, run_dir: str | Path | None = None, show_progress: bool | None = None
) -> Dataset:
    """The samples of :func:`build_pretrain_data`."""
    return build_pretrain_data(cfg, run_dir, show_progress)[0]


@dataclass
class LabeledData:
    """What :func:`build_labeled_data` gives: the fold's datasets and what was decided."""

    train: Dataset  # SliceDataset / CropDataset with labels, augmented
    val: VolumeDataset | None  # whole volumes of the validation cases (None: no validation)
    plan: DataPlan
    label_spec: LabelSpec
    train_ids: list[str]
    val_ids: list[str]
    splits: list[dict[str, Any]]  # every fold, nnU-Net's splits_final.json format
    fold: int


def build_labeled_data(
    cfg: DataConfig, run_dir: str | Path | None = None, show_progress: bool | None = None,
    validation: bool = True,
) -> LabeledData:
    """Labeled training samples and validation volumes of one fold (:mod:`.splits`).

    Training samples: slices (2d) or crops (3d) with ``"label"`` class indices,
    augmented. Validation: whole cropped volumes (:class:`VolumeDataset`, batch size 1,
    ``"case_index"``). CT statistics come from the training cases only. Raises
    :class:`~medtune.errors.DataError` for a case without a label or with label values
    outside the declared set, and for a split naming cases the dataset lacks.
    """
    if cfg.stream:
        raise ConfigError("data.stream is for pretraining; labeled training reads its cases from the cache "
                          "(data.cache_format: compressed makes it smaller)")
    spec = label_spec_for(cfg)
    cases = find_cases(_root(cfg), cfg.layout, cfg.modalities, require_labels=True)
    train_cases, val_cases, splits = plan_split(
        cases, val_fraction=cfg.val_fraction, split=cfg.split, folds=cfg.folds, fold=cfg.fold
    )
    if not train_cases:
        raise DataError(f"fold {cfg.fold} of {cfg.root} has no training cases ({len(cases)} labeled cases)")
    schemes = channel_schemes(cfg.normalization, channel_names(cfg))
    # the grid is the dataset's (every fold shares it, and its cache); intensities are the fold's
    axcodes, spacing = plan_grid(cfg.slice_axis, cfg.spacing, cases)
    train_cache = _cache(cfg, train_cases, run_dir, schemes, axcodes, spacing, show_progress, spec)
    normalizer = fit_normalizer(train_cache, schemes, labeled=True)
    if cfg.mode == "2d":
        train: Dataset = SliceDataset(train_cache, cfg.img_size, -1, cfg.min_foreground, True, spec, cfg.seed,
                                      normalizer=normalizer, augment=_augmenter(cfg))
    else:
        train = CropDataset(train_cache, cfg.crop_size, cfg.samples_per_volume, True, cfg.foreground_oversample,
                            spec, cfg.seed, normalizer=normalizer, augment=_augmenter(cfg))
    val = None
    if validation and val_cases:
        val_cache = _cache(cfg, val_cases, run_dir, schemes, axcodes, spacing, show_progress, spec)
        val = VolumeDataset(val_cache, with_label=True, label_spec=spec, normalizer=normalizer)
    return LabeledData(train, val, DataPlan(axcodes, spacing, normalizer, cfg.body_threshold), spec,
                       [c.case_id for c in train_cases], [c.case_id for c in val_cases], splits, cfg.fold)


def build_labeled_dataset(
    cfg: DataConfig,
    split: Literal["train", "val", "all"] = "train",
    run_dir: str | Path | None = None,
    show_progress: bool | None = None,
) -> Dataset:
    """One split of :func:`build_labeled_data`: ``train`` (samples), ``val`` (volumes), or
    ``all`` (every labeled case as whole volumes, normalised as the training cases)."""
    if split not in ("train", "val", "all"):
        raise ConfigError(f"unknown split '{split}' (train, val, all)")
    if split == "all":
        from dataclasses import replace

        everything = build_labeled_data(replace(cfg, val_fraction=0.0, split=None, folds=None, fold=0),
                                        run_dir, show_progress, validation=False)
        return VolumeDataset(everything.train.cache, True, everything.label_spec, everything.plan.normalizer)
    data = build_labeled_data(cfg, run_dir, show_progress, validation=split == "val")
    if split == "val":
        if data.val is None:
            raise DataError(f"split 'val' of {cfg.root} is empty ({len(data.train_ids)} training cases, "
                            f"val_fraction {cfg.val_fraction})")
        return data.val
    return data.train


__all__ = [
    "DataConfig", "DataPlan", "LabeledData", "PreparedCase", "add_data_arguments", "build_labeled_data",
    "build_labeled_dataset", "build_pretrain_data", "build_pretrain_dataset", "build_pretrain_holdout",
    "channel_names", "data_overrides",
    "dataset_key", "fit_normalizer", "label_spec_for", "plan_grid", "resolve_cache_dir", "split_cases",
]
