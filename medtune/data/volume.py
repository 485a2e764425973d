"""Read a :class:`~medtune.data.cases.Case` into arrays with nibabel.

Axes stay those of the NIfTI array (``H, W, D`` = i, j, k), with the modalities put
first: ``image (M, H, W, D)``; :mod:`medtune.data.geometry` then brings a case to the
training grid (orientation, spacing).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medtune.data.cases import Case
from medtune.data.geometry import affine_problem, axcodes_of, voxel_spacing
from medtune.errors import DataError

# What nibabel and gzip raise on a truncated or garbled file.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


@dataclass
class Volume:
    """One loaded case.

    Attributes:
        case_id: the case's name.
        image: ``(M, H, W, D)`` float32, modalities first, NIfTI array axes after.
        label: ``(H, W, D)`` uint8 with the dataset's raw label values, or None.
        affine: ``(4, 4)`` voxel-to-world matrix of the first modality.
        header: NIfTI header of the first modality (to write predictions alike).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the array axes (the lengths of the affine's columns)."""
        return voxel_spacing(self.affine)

    @property
    def orientation(self) -> str:
        """Orientation codes of the array axes, e.g. ``"LPS"``."""
        return axcodes_of(self.affine)


def open_nifti(path: Path, case_id: str) -> nib.Nifti1Image:
    """``nib.load`` with a :class:`DataError` naming the case and file on failure."""
    if not Path(path).is_file():
        raise DataError(f"case {case_id}: file not found: {path}")
    try:
        return nib.load(str(path))
    except _READ_ERRORS as exc:
        raise DataError(f"case {case_id}: cannot read NIfTI {path} ({exc})") from None


def read_array(img: nib.Nifti1Image, path: Path, case_id: str, dtype=np.float32) -> np.ndarray:
    """Decode the voxels of ``img`` (scaled by the header's slope/intercept)."""
    try:
        return np.asarray(img.get_fdata(dtype=dtype)) if dtype is not None else np.asarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise DataError(f"case {case_id}: cannot read NIfTI data of {path} ({exc})") from None


def check_finite(array: np.ndarray, path: Path, case_id: str) -> None:
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"case {case_id}: {bad} NaN/Inf voxels in {path}")


def label_to_uint8(raw: np.ndarray, path: Path, case_id: str) -> np.ndarray:
    """Raw label voxels -> uint8, refusing non-integer or out-of-range values."""
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype.kind == "f":
        check_finite(raw, path, case_id)
        if not np.array_equal(raw, np.round(raw)):
            raise DataError(f"case {case_id}: label {path} has non-integer values")
    low, high = (raw.min(), raw.max()) if raw.size else (0, 0)
    if low < 0 or high > 255:
        raise DataError(f"case {case_id}: label {path} has values outside 0..255 ({low}..{high})")
    return raw.astype(np.uint8)


def read_label(path: Path, case_id: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = open_nifti(path, case_id)
    raw = read_array(img, path, case_id, dtype=None)
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    return label_to_uint8(raw, path, case_id), img


AFFINE_TOLERANCE = 1e-3  # mm; the files of one case must share the voxel grid


def _spatial_shape(img: nib.Nifti1Image, path: Path, case_id: str, channels: tuple[int, ...] | None) -> tuple[int, ...]:
    """The 3D voxel grid of one file (a trailing channel axis of 1 dropped), or a DataError.

    ``channels`` (an MSD image file): the last-axis indices to read from a 4D file; a 3D
    file is one channel, so it serves ``channels == (0,)`` (single-modality MSD tasks)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1 and (channels is None or channels == (0,)):
        shape = shape[:3]
    if channels is not None:
        if len(shape) == 3 and tuple(channels) == (0,):
            return shape
        if len(shape) != 4:
            raise DataError(f"case {case_id}: expected a 4D image (channels last) in {path}, got shape {shape}")
        if max(channels) >= shape[3]:
            raise DataError(f"case {case_id}: {path} has {shape[3]} channels, channel {max(channels)} requested")
        return shape[:3]
    if len(shape) == 4:
        raise DataError(
            f"case {case_id}: {path} is a 4D image with {shape[3]} channels; "
            "expected one 3D volume per modality file"
        )
    if len(shape) != 3:
        raise DataError(f"case {case_id}: {path} is not a 3D volume (shape {shape}); medtune reads 3D images")
    return shape


def read_case(
    case: Case, with_label: bool = True, label_spec: Any = None
) -> tuple[Volume | None, list[str]]:
    """Read ``case`` and find every problem of it: the one reader that ``data check``,
    training (the cache) and prediction share.

    Problems, each naming the case and file: an unreadable or missing file, a file that
    is not a 3D volume (or 4D, for multi-channel images), an affine that cannot place the
    volume (not invertible, a zero or NaN spacing), files of different shapes or voxel
    grids (affines differing by more than 1e-3 mm), NaN/Inf voxels, a label of another
    shape or grid than the image, label values outside ``label_spec``.

    Returns:
        ``(volume, problems)``: the :class:`Volume` when there is no problem (else None).
    """
    problems: list[str] = []
    arrays: list[np.ndarray] = []
    grid: tuple[Path, tuple[int, ...], np.ndarray, nib.Nifti1Header] | None = None  # the first file's
    for path in case.images:
        try:
            img = open_nifti(path, case.case_id)
            shape = _spatial_shape(img, path, case.case_id, channels=case.channels)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if grid is None:
            if (problem := affine_problem(img.affine)) is not None:
                problems.append(f"case {case.case_id}: {path}: {problem}; the case cannot be placed in space")
                continue
            grid = (path, shape, np.asarray(img.affine), img.header)
        elif shape != grid[1]:
            problems.append(f"case {case.case_id}: {path} has shape {shape}, {grid[0].name} has {grid[1]}")
            continue
        elif not np.allclose(img.affine, grid[2], atol=AFFINE_TOLERANCE):
            problems.append(f"case {case.case_id}: {path} has another voxel-to-world affine than {grid[0].name}")
            continue
        try:
            data = read_array(img, path, case.case_id)
            if case.channels is not None and data.ndim == 4:
                data = np.moveaxis(data[..., list(case.channels)], -1, 0)  # (M, H, W, D)
            else:
                data = data.reshape((1,) + shape)
            check_finite(data, path, case.case_id)
            arrays.append(data)
        except DataError as exc:
            problems.append(str(exc))
    label = None
    if with_label and case.label is not None:
        try:
            label, label_img = read_label(case.label, case.case_id)
            if grid is not None and label.shape != grid[1]:
                problems.append(f"case {case.case_id}: label {case.label} has shape {label.shape}, image has {grid[1]}")
            elif grid is not None and not np.allclose(label_img.affine, grid[2], atol=AFFINE_TOLERANCE):
                problems.append(
                    f"case {case.case_id}: label {case.label} has another voxel-to-world affine than {grid[0].name}"
                )
            elif label_spec is not None and (bad := label_spec.invalid_values(label)):
                problems.append(
                    f"case {case.case_id}: label {case.label} has values {bad} "
                    f"outside the declared set {list(label_spec.values)}"
                )
        except DataError as exc:
            problems.append(str(exc))
    if problems or grid is None:
        return None, problems
    image = np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32)
    return Volume(case.case_id, image, label, grid[2], grid[3]), problems


def load_case(case: Case, with_label: bool = True, label_spec: Any = None) -> Volume:
    """Read all modalities (and the label) of ``case`` (:func:`read_case`).

    Returns:
        :class:`Volume` with ``image (M, H, W, D)`` float32 and ``label (H, W, D)``
        uint8 (raw dataset values) or None.

    Raises:
        DataError: the case's first problem (and how many more there are), naming the
            case and file.
    """
    volume, problems = read_case(case, with_label, label_spec)
    if problems:
        more = f" (and {len(problems) - 1} more problems; medtune data check lists them)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    assert volume is not None
    return volume
