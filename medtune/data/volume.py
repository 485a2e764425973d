"""Read a :class:`~medtune.data.cases.Case` into arrays with nibabel.

Axes stay those of the NIfTI array (``H, W, D`` = i, j, k; the slice axis is last for
BraTS), with the modalities put first: ``image (M, H, W, D)``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medtune.data.cases import Case
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
        """Voxel size in mm along the array axes."""
        return tuple(float(z) for z in self.header.get_zooms()[:3])


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


def load_case(case: Case, with_label: bool = True) -> Volume:
    """Read all modalities (and the label) of ``case``.

    Returns:
        :class:`Volume` with ``image (M, H, W, D)`` float32 and ``label (H, W, D)``
        uint8 (raw dataset values) or None.

    Raises:
        DataError: unreadable/corrupt file, modalities of different shapes, a label
            of another shape, NaN/Inf voxels; the message names the case and file.
    """
    first = open_nifti(case.images[0], case.case_id)
    if case.channels is not None:
        # One 4D file, modalities on the last axis (MSD).
        path = case.images[0]
        if len(first.shape) != 4:
            raise DataError(f"case {case.case_id}: expected a 4D image in {path}, got shape {first.shape}")
        if max(case.channels) >= first.shape[3]:
            raise DataError(
                f"case {case.case_id}: {path} has {first.shape[3]} channels, "
                f"channel {max(case.channels)} requested"
            )
        data = read_array(first, path, case.case_id)
        image = np.ascontiguousarray(np.moveaxis(data[..., list(case.channels)], -1, 0))
        check_finite(image, path, case.case_id)
    else:
        shape = tuple(first.shape[:3])
        image = np.empty((len(case.images),) + shape, dtype=np.float32)
        for m, path in enumerate(case.images):
            img = first if m == 0 else open_nifti(path, case.case_id)
            modality_shape = tuple(img.shape)
            if len(modality_shape) == 4 and modality_shape[3] == 1:
                modality_shape = modality_shape[:3]
            if modality_shape != shape:
                raise DataError(
                    f"case {case.case_id}: {path} has shape {modality_shape}, "
                    f"{case.images[0].name} has {shape}"
                )
            data = read_array(img, path, case.case_id).reshape(shape)
            check_finite(data, path, case.case_id)
            image[m] = data
    label = None
    if with_label and case.label is not None:
        label, _ = read_label(case.label, case.case_id)
        if label.shape != image.shape[1:]:
            raise DataError(
                f"case {case.case_id}: label {case.label} has shape {label.shape}, "
                f"image has {image.shape[1:]}"
            )
    return Volume(case.case_id, image, label, np.asarray(first.affine), first.header)
