"""Torch datasets over a :class:`~medtune.data.cache.VolumeCache`.

- :class:`SliceDataset`: 2D slices, one item per (case, slice) pair, so a shuffled
  DataLoader spreads a volume's slices over many batches (the FreMAE recipe).
- :class:`CropDataset`: 3D random crops, with nnU-Net-style oversampling of labeled
  foreground.
- :class:`VolumeDataset`: whole cached volumes (validation, sliding-window inference).

Random crop positions and augmentation (:mod:`.augment`, on the DataLoader workers)
come from generators seeded by ``(seed, epoch, index)``: an item is the same in every
run, every worker layout and after a resume, and changes with :meth:`set_epoch`.
CT channels, stored in HU by the cache, are normalised per item with the dataset's
statistics (:class:`~medtune.data.intensity.Normalizer`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medtune.data.augment import Augmenter, sample_seed
from medtune.data.cache import VolumeCache
from medtune.data.intensity import Normalizer
from medtune.data.labels import LabelSpec
from medtune.errors import DataError


def read_window(array: np.ndarray, starts: Sequence[int], size: Sequence[int], fill: float | np.ndarray = 0) -> np.ndarray:
    """Copy the box ``[start, start + size)`` of the last ``len(size)`` axes of ``array``.

    Starts may be negative and boxes may run past the end: the part outside ``array``
    is ``fill``. Only the part inside is read, so a memory-mapped array is touched only
    where needed.

    Args:
        array: ``(..., *S)``.
        fill: a number, or an array broadcast over the output (one value per channel:
            shape ``(M, 1, 1, ...)``).
    Returns:
        ``(..., *size)``, a new array of ``array``'s dtype.
    """
    lead = array.shape[: array.ndim - len(size)]
    spatial = array.shape[array.ndim - len(size):]
    out = np.full(lead + tuple(size), fill, dtype=array.dtype)
    source, target = [], []
    for start, length, extent in zip(starts, size, spatial):
        low, high = max(start, 0), min(start + length, extent)
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    out[(Ellipsis, *target)] = array[(Ellipsis, *source)]
    return out


def random_starts(rng: np.random.Generator, extent: Sequence[int], size: Sequence[int]) -> list[int]:
    """Uniform crop starts; where the volume is smaller than the crop, it is placed at a
    random offset inside the crop (negative start) and the rest padded."""
    starts = []
    for n, s in zip(extent, size):
        starts.append(int(rng.integers(0, n - s + 1)) if n >= s else -int(rng.integers(0, s - n + 1)))
    return starts


class _CacheDataset(Dataset):
    """What the cache datasets share: labels as class indices, per-item seeded crops and
    augmentation, CT channels normalised per item."""

    def __init__(self, cache: VolumeCache, with_label: bool, label_spec: LabelSpec | None, seed: int,
                 normalizer: Normalizer | None = None, augment: Augmenter | None = None) -> None:
        self.cache = cache
        self.with_label = with_label
        self.label_spec = label_spec or LabelSpec()
        self.seed = int(seed)
        self.epoch = 0
        self.normalizer = normalizer
        self.augment = augment if augment is not None and augment.active else None
        self._fill: float | np.ndarray = 0.0
        if normalizer is not None:
            if len(normalizer.norms) != cache.num_modalities:
                raise DataError(f"{len(normalizer.norms)} channel normalisations for {cache.num_modalities} channels")
            self._fill = normalizer.raw_fill()
        if with_label:
            unlabeled = [cache.case_ids[i] for i in range(len(cache)) if not cache.has_label(i)]
            if unlabeled:
                raise DataError(f"with_label=True but case {unlabeled[0]} has no label")

    def set_epoch(self, epoch: int) -> None:
        """Draw new crop positions for epoch ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _label_index(self, label: np.ndarray, case_index: int) -> np.ndarray:
        where = f"case {self.cache.case_ids[case_index]}: label"
        return self.label_spec.to_index(label, where)

    def _image_fill(self, spatial_dims: int) -> float | np.ndarray:
        """Padding of an image window: per channel, the cached background (see Normalizer.raw_fill)."""
        if isinstance(self._fill, np.ndarray):
            return self._fill.reshape((-1,) + (1,) * spatial_dims)
        return self._fill

    def _finish(self, item: dict[str, np.ndarray], index: int) -> dict[str, torch.Tensor]:
        """Normalise CT channels, augment (seeded by seed, epoch, index), make tensors."""
        if self.normalizer is not None:
            item["image"] = self.normalizer.finish(item["image"])
        if self.augment is not None:
            return self.augment(item, sample_seed(self.seed, self.epoch, index))
        return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in item.items()}


class SliceDataset(_CacheDataset):
    """2D slices of cached volumes, cropped or padded to ``img_size``.

    Args:
        cache: the preprocessed volumes.
        img_size: side ``s`` of the square slices returned (int or ``(h, w)``).
        axis: spatial axis the slices are cut along (-1: the last, axial for BraTS).
        min_foreground: keep only slices whose fraction of foreground pixels (all
            modalities nonzero) is at least this.
        with_label: add ``"label"`` (class indices via ``label_spec``).
        label_spec: label values -> class indices (default BraTS 0, 1, 2, 4).
        seed: base seed of crop positions and augmentation.
        normalizer: per-channel normalisation of CT channels (None: the cache's values).
        augment: 2D augmentation of each slice (:class:`~medtune.data.augment.Augmenter`).
        slices_per_case: None: every slice is an item. A number k: k items per case, each
            a slice drawn per (seed, epoch, index) among the case's slices that pass
            ``min_foreground``: the cases are not read up front (the stream, :mod:`.stream`).

    Items: ``{"image": (M, s, s) float32, "foreground": (s, s) bool}`` and, with labels,
    ``"label": (s, s) int64``. :attr:`pairs` ``(N, 2)`` lists (case, slice) per item
    (slice -1: drawn when read).
    """

    def __init__(
        self,
        cache: VolumeCache,
        img_size: int | Sequence[int],
        axis: int = -1,
        min_foreground: float = 0.0,
        with_label: bool = False,
        label_spec: LabelSpec | None = None,
        seed: int = 0,
        normalizer: Normalizer | None = None,
        augment: Augmenter | None = None,
        slices_per_case: int | None = None,
    ) -> None:
        super().__init__(cache, with_label, label_spec, seed, normalizer, augment)
        self.img_size = (int(img_size),) * 2 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if not -3 <= axis <= 2:
            raise ValueError(f"slice axis must be a spatial axis in -3..2, got {axis}")
        self.axis = axis % 3
        self.min_foreground = float(min_foreground)
        if slices_per_case is not None:
            if slices_per_case < 1:
                raise ValueError(f"slices_per_case must be >= 1, got {slices_per_case}")
            cases = np.repeat(np.arange(len(cache)), slices_per_case)
            self.pairs = np.stack([cases, np.full_like(cases, -1)], axis=1).astype(np.int64)
            return
        pairs = [np.stack([np.full_like(s, i), s], axis=1) for i in range(len(cache)) for s in [self._slices(i)]]
        self.pairs = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)

    def _slices(self, case_index: int) -> np.ndarray:
        """The case's slices with at least ``min_foreground`` foreground (all of them when 0)."""
        if self.min_foreground <= 0:
            return np.arange(self.cache.spatial_shape(case_index)[self.axis])
        foreground = self.cache.load(case_index).foreground
        other = tuple(a for a in range(3) if a != self.axis)
        return np.flatnonzero(np.asarray(foreground).mean(axis=other) >= self.min_foreground)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case_index, slice_index = (int(v) for v in self.pairs[index])
        volume = self.cache.load(case_index)
        rng = self._rng(index)
        if slice_index < 0:  # drawn per item (slices_per_case)
            slices = self._slices(case_index)
            if len(slices) == 0:
                raise DataError(f"case {self.cache.case_ids[case_index]}: no slice has "
                                f"{self.min_foreground} foreground (data.min_foreground)")
            slice_index = int(slices[rng.integers(len(slices))])
        in_plane = [n for a, n in enumerate(self.cache.spatial_shape(case_index)) if a != self.axis]
        in_plane_starts = iter(random_starts(rng, in_plane, self.img_size))
        in_plane_size = iter(self.img_size)
        # a 3D window one slice thick: only the window is read, from a memory map or from chunks
        starts = [slice_index if a == self.axis else next(in_plane_starts) for a in range(3)]
        size = [1 if a == self.axis else next(in_plane_size) for a in range(3)]
        plane = (Ellipsis,) + tuple(0 if a == self.axis else slice(None) for a in range(3))

        def cut(array: np.ndarray, fill: float | np.ndarray = 0) -> np.ndarray:  # (..., H, W, D) -> (..., s, s)
            return read_window(array, starts, size, fill)[plane]

        item = {"image": cut(volume.image, self._image_fill(3)), "foreground": cut(volume.foreground)}
        if self.with_label:
            item["label"] = self._label_index(cut(volume.label), case_index)
        return self._finish(item, index)


class CropDataset(_CacheDataset):
    """3D random crops of cached volumes.

    Args:
        cache: the preprocessed volumes.
        crop_size: ``(h, w, d)``; volumes smaller than the crop are padded with 0.
        samples_per_volume: crops per case per epoch.
        with_label: add ``"label"`` (class indices via ``label_spec``).
        foreground_oversample: probability that a crop is centred on a labeled
            foreground voxel (label > 0) instead of placed uniformly; used only for
            cases with a label that has foreground.
        label_spec: label values -> class indices (default BraTS 0, 1, 2, 4).
        seed: base seed of crop positions and augmentation.
        normalizer: per-channel normalisation of CT channels (None: the cache's values).
        augment: 3D augmentation of each crop (:class:`~medtune.data.augment.Augmenter`).

    Items: ``{"image": (M, h, w, d) float32, "foreground": (h, w, d) bool}`` and, with
    labels, ``"label": (h, w, d) int64``.
    """

    def __init__(
        self,
        cache: VolumeCache,
        crop_size: Sequence[int],
        samples_per_volume: int = 1,
        with_label: bool = False,
        foreground_oversample: float = 0.33,
        label_spec: LabelSpec | None = None,
        seed: int = 0,
        normalizer: Normalizer | None = None,
        augment: Augmenter | None = None,
    ) -> None:
        super().__init__(cache, with_label, label_spec, seed, normalizer, augment)
        self.crop_size = tuple(int(s) for s in crop_size)
        if len(self.crop_size) != 3:
            raise ValueError(f"crop_size must have 3 sizes, got {self.crop_size}")
        if samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
        self.samples_per_volume = int(samples_per_volume)
        self.foreground_oversample = float(foreground_oversample)

    def __len__(self) -> int:
        return len(self.cache) * self.samples_per_volume

    def _starts(self, rng: np.random.Generator, case_index: int) -> list[int]:
        extent = self.cache.spatial_shape(case_index)
        volume = self.cache.load(case_index)
        locations = volume.label_locations
        if (
            locations is not None
            and len(locations) > 0
            and rng.random() < self.foreground_oversample
        ):
            centre = locations[int(rng.integers(0, len(locations)))]
            starts = []
            for c, n, s in zip(centre, extent, self.crop_size):
                # centre the crop on the voxel, shifted to stay inside when the volume allows
                start = int(c) - s // 2
                start = min(max(start, 0), n - s) if n >= s else min(max(start, n - s), 0)
                starts.append(start)
            return starts
        return random_starts(rng, extent, self.crop_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case_index = index // self.samples_per_volume
        volume = self.cache.load(case_index)
        starts = self._starts(self._rng(index), case_index)
        item = {
            "image": read_window(volume.image, starts, self.crop_size, self._image_fill(3)),
            "foreground": read_window(volume.foreground, starts, self.crop_size),
        }
        if self.with_label:
            item["label"] = self._label_index(read_window(volume.label, starts, self.crop_size), case_index)
        return self._finish(item, index)


class VolumeDataset(_CacheDataset):
    """Whole cached volumes, one item per case (validation, sliding-window inference).

    Items: ``{"image": (M, h, w, d) float32, "foreground": (h, w, d) bool,
    "case_index": () int64}`` and, with labels, ``"label": (h, w, d) int64``. Volumes
    differ in size, so use ``batch_size=1``; ``cache.meta(case_index)`` gives the bbox
    and original shape to paste a prediction back (:func:`paste_from_bbox`). Never
    augmented; CT channels normalised by ``normalizer``.
    """

    def __init__(self, cache: VolumeCache, with_label: bool = False, label_spec: LabelSpec | None = None,
                 normalizer: Normalizer | None = None) -> None:
        super().__init__(cache, with_label, label_spec, seed=0, normalizer=normalizer)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        volume = self.cache.load(index)
        image = np.ascontiguousarray(volume.image)
        item = {
            "image": torch.from_numpy(self.normalizer.finish(image) if self.normalizer is not None else image),
            "foreground": torch.from_numpy(np.ascontiguousarray(volume.foreground)),
            "case_index": torch.tensor(index, dtype=torch.int64),
        }
        if self.with_label:
            item["label"] = torch.from_numpy(self._label_index(np.ascontiguousarray(volume.label), index))
        return item
