"""Preprocess each case once; read it back as memory-mapped ``.npy`` every epoch.

Decoding a gzipped BraTS volume costs about a second; an epoch of slices touches every
volume many times. :class:`VolumeCache` brings each case to the training grid once
(:mod:`.geometry`: reoriented so the slice axis is last, resampled to the target
spacing), crops it to its foreground box, normalises it (:mod:`.intensity`) and stores::

    <cache_dir>/<case_id>/image.npy        (M, h, w, d) float32: z-scored channels, CT channels in HU
    <cache_dir>/<case_id>/foreground.npy   (h, w, d) bool, foreground in all modalities
    <cache_dir>/<case_id>/label.npy        (h, w, d) uint8 raw values (labeled cases)
    <cache_dir>/<case_id>/label_locations.npy  (K, 3) int32 sample of label>0 voxels
    <cache_dir>/<case_id>/meta.json        sources (size, mtime), grids, bbox, shapes

Arrays are read with ``np.load(mmap_mode="r")``, so later epochs never decode NIfTI
and DataLoader workers share the page cache. They are stored in Fortran order, so a
slice along the last axis is contiguous on disk; the memory maps are therefore
Fortran-ordered (use ``np.ascontiguousarray`` for a C-ordered copy). A case is rebuilt when a source file's
size or mtime changes. Every file is written to a temporary name and renamed, and
``meta.json`` is written last, so two processes (Accelerate ranks) building the same
cache at once never leave a half-written case behind; a per-case ``flock`` makes one
of them build a case while the other waits and then reads it.

``cache_format="compressed"`` (``data.cache_format``) stores the same arrays as
``<name>.zst`` instead: zstd-compressed chunks (:mod:`.chunked`), of which a slice or crop
decompresses only those it overlaps. Smaller on disk, more CPU per read. The case's
preparation itself (:func:`prepare_case`) is shared with the stream (:mod:`.stream`),
which reads cases without writing them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medtune.checkpoints.lock import FileLock
from medtune.data.cases import Case
from medtune.data.chunked import ChunkedArray, write_chunked
from medtune.data.labels import LabelSpec
from medtune.data.geometry import CaseGrid, Grid, to_training_grid
from medtune.data.intensity import DEFAULT_BODY_THRESHOLD, cache_stage, foreground
from medtune.data.preprocess import BBox, crop_to_bbox, nonzero_bbox
from medtune.data.volume import load_case
from medtune.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 3
MAX_LABEL_LOCATIONS = 10_000
FORMATS = {"npy": ".npy", "compressed": ".zst"}  # data.cache_format -> the arrays' file suffix


@dataclass
class CachedVolume:
    """One cached case, arrays memory-mapped read-only.

    Attributes:
        image: ``(M, h, w, d)`` float32 on the training grid, cropped to ``bbox``:
            ``zscore`` channels normalised, ``ct``/``none`` channels as read.
        foreground: ``(h, w, d)`` bool, voxels that are foreground in all modalities.
        label: ``(h, w, d)`` uint8 raw label values, or None.
        label_locations: ``(K, 3)`` int32 voxel coordinates with label > 0 (a random
            sample, for foreground oversampling), or None.
        meta: the case's ``meta.json`` (``bbox``, ``original_shape``, ``affine``, ...).
    """

    image: np.ndarray
    foreground: np.ndarray
    label: np.ndarray | None
    label_locations: np.ndarray | None
    meta: dict


def is_main_process() -> bool:
    """False in the non-zero ranks of a distributed (Accelerate/torchrun) launch."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def settings_of(normalize: bool, crop: bool, axcodes: str | None, spacing: Sequence[float] | None,
                schemes: Sequence[str], body_threshold: float, cache_format: str = "npy") -> dict:
    """What a cached case depends on besides its files (a case built otherwise is rebuilt)."""
    settings = {
        "version": CACHE_VERSION, "normalize": bool(normalize), "crop": bool(crop), "axcodes": axcodes,
        "spacing": None if spacing is None else [round(float(s), 6) for s in spacing],
        "schemes": list(schemes), "body_threshold": float(body_threshold),
    }
    if cache_format != "npy":  # only then: caches written before the compressed format stay valid
        settings["format"] = cache_format
    return settings


@dataclass(frozen=True)
class Preparation:
    """How a case is brought to the training grid (see :class:`VolumeCache`'s arguments)."""

    normalize: bool = True
    crop: bool = True
    axcodes: str | None = "RAS"
    spacing: Sequence[float] | None = None
    schemes: Sequence[str] = ()
    body_threshold: float = DEFAULT_BODY_THRESHOLD
    with_labels: bool = True
    label_spec: LabelSpec | None = None


def prepare_case(case: Case, how: Preparation) -> tuple[dict[str, np.ndarray], dict]:
    """Read ``case`` and prepare it as the cache stores it, in memory.

    Returns ``(arrays, facts)``: arrays ``image`` ``(M, h, w, d)`` float32, ``foreground``
    ``(h, w, d)`` bool and, for a labeled case read with labels, ``label`` ``(h, w, d)``
    uint8 and ``label_locations`` ``(K, 3)`` int32; facts are the meta entries
    ``original_shape``, ``bbox``, ``shape``, ``affine``, ``spacing``, ``grid``. The cache
    writes these; a stream (:mod:`.stream`) reads them without writing.
    """
    volume = load_case(case, with_label=how.with_labels, label_spec=how.label_spec)
    if len(how.schemes) != volume.image.shape[0]:
        raise DataError(f"case {case.case_id}: {volume.image.shape[0]} channels, {len(how.schemes)} schemes given")
    if how.axcodes is None:
        grid = Grid(volume.spatial_shape, volume.affine)
        image, label, case_grid = volume.image, volume.label, CaseGrid(grid, grid, grid)
    else:
        image, label, case_grid = to_training_grid(volume.image, volume.label, volume.affine, how.axcodes, how.spacing)
    schemes = tuple(how.schemes) if how.normalize else ("none",) * len(how.schemes)
    original_shape = list(image.shape[1:])
    bbox: BBox = tuple((0, n) for n in original_shape)
    if how.crop:
        bbox = nonzero_bbox(foreground(image, schemes, how.body_threshold, "any"))
        image = crop_to_bbox(image, bbox)
        label = crop_to_bbox(label, bbox) if label is not None else None
    mask = foreground(image, schemes, how.body_threshold, "all")
    image = cache_stage(image, schemes)
    arrays = {"image": image.astype(np.float32, copy=False), "foreground": mask}
    if label is not None:
        arrays["label"] = label
        locations = np.argwhere(label > 0).astype(np.int32)
        if len(locations) > MAX_LABEL_LOCATIONS:
            rng = np.random.default_rng(0)
            keep = np.sort(rng.choice(len(locations), MAX_LABEL_LOCATIONS, replace=False))
            locations = locations[keep]
        arrays["label_locations"] = locations
    facts = {
        "original_shape": original_shape,
        "bbox": [list(b) for b in bbox],
        "shape": list(image.shape),
        "affine": np.asarray(volume.affine).tolist(),
        "spacing": list(case_grid.target.spacing),
        "grid": case_grid.to_json(),
    }
    return arrays, facts


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def _source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _channels(case: Case) -> list[int] | None:
    """The last-axis indices read from a single 4D image file (MSD), else None."""
    return list(case.channels) if case.channels is not None else None


def _atomic_save(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared like the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_array(path: Path, array: np.ndarray, cache_format: str) -> None:
    """``npy``: Fortran order, so the last (slice) axis varies slowest and one slice is one
    contiguous block on disk (about 10x faster slice reads than C order; 3D crops read no
    slower). ``compressed``: zstd chunks (:mod:`.chunked`)."""

    def write(tmp: Path) -> None:
        if cache_format == "compressed":
            write_chunked(tmp, array)
            return
        with open(tmp, "wb") as handle:
            np.save(handle, np.asfortranarray(array))

    _atomic_save(path, write)


class VolumeCache:
    """Preprocessed, memory-mapped copies of a list of cases.

    Args:
        cases: the cases to cache (from :func:`~medtune.data.find_cases`).
        cache_dir: where the ``.npy`` files go; shared between runs on the same data.
        normalize: normalise by ``schemes`` (False: every channel as read).
        crop: crop to the box of voxels that are foreground in any modality.
        axcodes: orientation of the training grid (``"RAS"``: axial slices along the last
            axis; see :func:`~medtune.data.geometry.canonical_axcodes`); None keeps each
            file's own axes.
        spacing: target voxel spacing in mm (training-grid axis order), or None to keep
            each case's spacing.
        schemes: intensity scheme per channel (``zscore``, ``ct``, ``none``); None:
            ``zscore`` for every channel.
        body_threshold: CT channels: the HU above which a voxel is body (foreground).
        label_spec: if given, label values outside it are a :class:`DataError` at
            build time (naming the case and file).
        with_labels: cache the labels of labeled cases (a case cached without its
            label is rebuilt when later asked for it with ``with_labels=True``).
        show_progress: tqdm bar while building; None: only on the main process
            (rank 0 by the ``RANK``/``LOCAL_RANK`` environment variables).
        cache_format: ``npy`` (memory-mapped ``.npy``) or ``compressed`` (zstd chunks,
            ``.zst``, read a box at a time: :mod:`.chunked`); a case stored in the other
            format is rebuilt.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        cache_dir: str | Path,
        normalize: bool = True,
        crop: bool = True,
        label_spec: LabelSpec | None = None,
        with_labels: bool = True,
        show_progress: bool | None = None,
        axcodes: str | None = "RAS",
        spacing: Sequence[float] | None = None,
        schemes: Sequence[str] | None = None,
        body_threshold: float = DEFAULT_BODY_THRESHOLD,
        cache_format: str = "npy",
    ) -> None:
        if cache_format not in FORMATS:
            raise DataError(f"cache format must be one of {', '.join(FORMATS)}, got {cache_format!r}")
        if not cases:
            raise DataError(f"no cases to cache in {cache_dir}")
        self.cases = list(cases)
        self.cache_dir = Path(cache_dir)
        self.normalize = normalize
        self.crop = crop
        self.axcodes = axcodes
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        count = self.cases[0].num_modalities
        self.schemes = tuple(schemes) if schemes is not None else ("zscore",) * count
        self.body_threshold = float(body_threshold)
        self.label_spec = label_spec
        self.with_labels = with_labels
        self.cache_format = cache_format
        self._handles: dict[int, CachedVolume] = {}
        self._metas: list[dict] = self.build(show_progress)

    # ------------------------------------------------------------------ building

    def _settings(self) -> dict:
        return settings_of(self.normalize, self.crop, self.axcodes, self.spacing, self.schemes, self.body_threshold,
                           self.cache_format)

    def case_dir(self, index: int) -> Path:
        return self.cache_dir / _safe_name(self.cases[index].case_id)

    def _sources(self, case: Case) -> tuple[list[dict], dict | None]:
        """Size/mtime stamps of the image files and of the label (if it is cached)."""
        try:
            images = [_source_stamp(f) for f in case.images]
            label = _source_stamp(case.label) if self.with_labels and case.label is not None else None
        except FileNotFoundError as exc:
            raise DataError(f"case {case.case_id}: file not found: {exc.filename}") from None
        return images, label

    def _valid_meta(self, index: int, sources: tuple[list[dict], dict | None]) -> dict | None:
        folder = self.case_dir(index)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        image_sources, label_source = sources
        if meta.get("settings") != self._settings() or meta.get("sources") != image_sources:
            return None
        # an MSD 4D file read with another modality selection is the same source, other data
        if meta.get("channels") != _channels(self.cases[index]):
            return None
        # A cache built with labels also serves label-free use; not the other way round.
        if label_source is not None and meta.get("label_source") != label_source:
            return None
        # a file of another size than written (crash before it reached the disk) -> rebuild
        for name, size in meta.get("array_bytes", {}).items():
            try:
                if (folder / name).stat().st_size != size:
                    return None
            except OSError:
                return None
        return meta

    def build(self, show_progress: bool | None = None) -> list[dict]:
        """Build every missing or stale case; returns each case's meta.

        Several processes may call this at once on one ``cache_dir``: a per-case file
        lock lets one build each case, and every file is renamed into place whole."""
        if show_progress is None:
            show_progress = is_main_process()
        metas: list[dict | None] = []
        stale = []
        for i, case in enumerate(self.cases):
            meta = self._valid_meta(i, self._sources(case))
            metas.append(meta)
            if meta is None:
                stale.append(i)
        if stale:
            log.info("caching %d of %d cases in %s", len(stale), len(self.cases), self.cache_dir)
            iterator: Any = stale
            if show_progress:
                from tqdm.auto import tqdm

                iterator = tqdm(stale, desc="cache", unit="case")
            for i in iterator:
                with FileLock(self.case_dir(i) / ".lock"):
                    # another process may have built it while this one waited
                    metas[i] = self._valid_meta(i, self._sources(self.cases[i])) or self._build_case(i)
        return [m for m in metas if m is not None]

    def _build_case(self, index: int) -> dict:
        case = self.cases[index]
        image_sources, label_source = self._sources(case)
        arrays, facts = prepare_case(case, self.preparation())
        folder = self.case_dir(index)
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for stem, array in arrays.items():
            name = stem + FORMATS[self.cache_format]
            files[name] = array
            _save_array(folder / name, array, self.cache_format)
        meta = {
            "case_id": case.case_id,
            "settings": self._settings(),
            "sources": image_sources,
            "channels": _channels(case),
            "label_source": label_source if "label" in arrays else None,
            "arrays": sorted(files),
            "array_bytes": {name: (folder / name).stat().st_size for name in sorted(files)},
            **facts,
        }
        text = json.dumps(meta, indent=1)
        _atomic_save(folder / "meta.json", lambda tmp: tmp.write_text(text))
        return meta

    def preparation(self) -> "Preparation":
        """How this cache prepares a case (what :func:`prepare_case` takes)."""
        return Preparation(self.normalize, self.crop, self.axcodes, self.spacing, self.schemes,
                           self.body_threshold, self.with_labels, self.label_spec)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def meta(self, index: int) -> dict:
        """The case's meta: ``bbox`` [[start, stop]] x 3 on the training grid,
        ``original_shape`` (the training grid's, before the crop), ``shape`` ``[M, h, w, d]``,
        ``affine`` (the file's), ``spacing`` (the training grid's), ``grid``
        (:class:`~medtune.data.geometry.CaseGrid` as JSON), ``sources``."""
        return self._metas[index]

    def case_grid(self, index: int) -> CaseGrid:
        return CaseGrid.from_json(self._metas[index]["grid"])

    def spatial_shape(self, index: int) -> tuple[int, ...]:
        """``(h, w, d)`` of the cached (cropped) case."""
        return tuple(self._metas[index]["shape"][1:])

    @property
    def num_modalities(self) -> int:
        return int(self._metas[0]["shape"][0])

    def has_label(self, index: int) -> bool:
        return self.with_labels and "label" + FORMATS[self.cache_format] in self._metas[index]["arrays"]

    def load(self, index: int) -> CachedVolume:
        """Case ``index``'s arrays, opened once per process: memory maps (``npy``) or
        :class:`~medtune.data.chunked.ChunkedArray` (``compressed``; ``label_locations``
        read whole). Both read only the part a slice or crop indexes."""
        cached = self._handles.get(index)
        if cached is None:
            folder = self.case_dir(index)
            has_label = self.has_label(index)

            def open_array(stem: str) -> Any:
                if self.cache_format == "compressed":
                    return ChunkedArray(folder / f"{stem}.zst")
                return np.load(folder / f"{stem}.npy", mmap_mode="r")

            cached = CachedVolume(
                image=open_array("image"),
                foreground=open_array("foreground"),
                label=open_array("label") if has_label else None,
                label_locations=np.asarray(open_array("label_locations")) if has_label else None,
                meta=self._metas[index],
            )
            self._handles[index] = cached
        return cached

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each DataLoader worker, never pickled as copies.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
