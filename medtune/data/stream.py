"""Pretraining on corpora that do not fit the cache: cases read lazily, shuffled within a buffer.

``data.stream: true``. Nothing is cached up front: each epoch reads every case once, from
its files, through the cache's own preparation (:func:`~medtune.data.cache.prepare_case`:
training grid, crop, normalisation), cuts its samples, and emits them shuffled through a
bounded buffer. In memory: the case being cut, the cases being read ahead, and at most
``buffer_size`` (+ one case's) samples.

What an item *is* does not depend on the order: item ``i`` is sample ``i % k`` of case
``i // k`` (``k`` = samples per case), cut by the cache datasets
(:class:`~medtune.data.datasets.SliceDataset` with ``slices_per_case``,
:class:`~medtune.data.datasets.CropDataset`) seeded by (seed, epoch, index). The *order*
is a function of (seed, epoch) alone, computed on indices before any data is read
(:func:`stream_order`): a seeded permutation of the cases fills the buffer, each sample
leaves it at a seeded random position. So a resumed run skips the consumed samples
without reading them (:meth:`StreamingDataset.skip_items`, called by the training loop)
and then reads exactly what an uninterrupted run reads.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medtune.data.cache import CachedVolume, Preparation, prepare_case
from medtune.data.cases import Case
from medtune.data.datasets import _CacheDataset
from medtune.errors import DataError


def stream_order(num_cases: int, per_case: int, buffer_size: int, seed: int, epoch: int) -> tuple[list[int], list[int]]:
    """The epoch's item order and the order cases are read in.

    Cases enter in a permutation seeded by (seed, epoch), each bringing its ``per_case``
    items ``case * per_case + j``; while more than ``buffer_size`` items wait, one leaves
    from a seeded random position; the rest leave shuffled at the end.

    Returns ``(items, cases)``: every item exactly once, and the case permutation.
    """
    rng = np.random.default_rng([seed, epoch, 0x5712EA])
    cases = [int(c) for c in rng.permutation(num_cases)]
    buffer: list[int] = []
    items: list[int] = []
    for case in cases:
        buffer.extend(range(case * per_case, (case + 1) * per_case))
        while len(buffer) > buffer_size:
            at = int(rng.integers(len(buffer)))
            buffer[at], buffer[-1] = buffer[-1], buffer[at]
            items.append(buffer.pop())
    items.extend(int(i) for i in rng.permutation(np.asarray(buffer, dtype=np.int64)))
    return items, cases


class CaseReader:
    """The reading side of :class:`~medtune.data.cache.VolumeCache` without a cache:
    ``load(i)`` prepares case ``i`` from its files (the case being cut is held; the
    stream hands it the cases it read ahead with :meth:`hold`)."""

    def __init__(self, cases: Sequence[Case], how: Preparation) -> None:
        if not cases:
            raise DataError("no cases to stream")
        self.cases = list(cases)
        self.how = how
        self._held: dict[int, CachedVolume] = {}

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def num_modalities(self) -> int:
        return self.cases[0].num_modalities

    def has_label(self, index: int) -> bool:
        return self.how.with_labels and self.cases[index].label is not None

    def read(self, index: int) -> CachedVolume:
        """Prepare case ``index`` in memory (thread-safe: the stream reads ahead with it)."""
        arrays, facts = prepare_case(self.cases[index], self.how)
        return CachedVolume(arrays["image"], arrays["foreground"], arrays.get("label"),
                            arrays.get("label_locations"), {"case_id": self.cases[index].case_id, **facts})

    def hold(self, index: int, volume: CachedVolume) -> None:
        """Make ``volume`` the one case kept in memory."""
        self._held = {index: volume}

    def load(self, index: int) -> CachedVolume:
        if index not in self._held:
            self.hold(index, self.read(index))
        return self._held[index]

    def meta(self, index: int) -> dict:
        return self.load(index).meta

    def spatial_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.load(index).image.shape[1:])


class StreamingDataset(IterableDataset):
    """Samples of a :class:`CaseReader`, read case by case and shuffled in a bounded buffer.

    Args:
        items: a :class:`SliceDataset` (with ``slices_per_case``) or :class:`CropDataset`
            over a :class:`CaseReader`: what item ``i`` is.
        per_case: items per case (``slices_per_case`` / ``samples_per_volume`` of ``items``).
        buffer_size: samples held for shuffling.
        read_ahead: cases read in background threads ahead of the one being cut (0: none).

    ``len()`` is the items of an epoch; ``stream[i]`` is item ``i`` (reads its case).
    Iterate it in the training process (DataLoader ``num_workers=0``: :func:`build_loader`
    does so): worker processes would each read every case.
    """

    def __init__(self, items: _CacheDataset, per_case: int, buffer_size: int, read_ahead: int = 2) -> None:
        if not isinstance(items.cache, CaseReader):
            raise TypeError("StreamingDataset needs items over a CaseReader")
        if len(items) != len(items.cache) * per_case:
            raise ValueError(f"{len(items)} items are not {per_case} per case of {len(items.cache)}")
        if buffer_size < 1:
            raise ValueError(f"the stream's buffer must hold at least one sample, got {buffer_size}")
        self.items = items
        self.reader: CaseReader = items.cache
        self.per_case = int(per_case)
        self.buffer_size = int(buffer_size)
        self.read_ahead = int(read_ahead)
        self.epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]

    def set_epoch(self, epoch: int) -> None:
        """Stream epoch ``epoch`` (from its start, unless :meth:`skip_items` says otherwise
        for this epoch: Accelerate sets the epoch again as it starts iterating)."""
        if int(epoch) != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)
        self.items.set_epoch(epoch)

    def skip_items(self, count: int) -> None:
        """Start the next pass over this epoch at item ``count`` (resume), reading only
        the cases whose items are still to come."""
        self._skip = int(count)

    def order(self) -> tuple[list[int], list[int]]:
        """This epoch's ``(items, cases)`` (:func:`stream_order`)."""
        return stream_order(len(self.reader), self.per_case, self.buffer_size, self.items.seed, self.epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            raise DataError("a data stream is read in the training process (DataLoader num_workers=0); "
                            "it reads ahead with data.num_workers threads")
        order, case_order = self.order()
        wanted = order[self._skip:]
        self._skip = 0
        position = {item: at for at, item in enumerate(wanted)}
        cases = [c for c in case_order if any(c * self.per_case + j in position for j in range(self.per_case))]
        ready: dict[int, dict[str, torch.Tensor]] = {}
        emitted = 0
        with ThreadPoolExecutor(max(1, self.read_ahead)) as pool:
            pending: deque = deque()
            upcoming = iter(cases)
            for case in upcoming:
                pending.append((case, pool.submit(self.reader.read, case)))
                if len(pending) > self.read_ahead:
                    break
            while pending:
                case, future = pending.popleft()
                self.reader.hold(case, future.result())
                next_case = next(upcoming, None)
                if next_case is not None:
                    pending.append((next_case, pool.submit(self.reader.read, next_case)))
                for item in range(case * self.per_case, (case + 1) * self.per_case):
                    if item in position:
                        ready[item] = self.items[item]
                while emitted < len(wanted) and wanted[emitted] in ready:
                    yield ready.pop(wanted[emitted])
                    emitted += 1
        if emitted != len(wanted):  # every item's case was read, so none can be missing
            raise RuntimeError(f"stream emitted {emitted} of {len(wanted)} items")
