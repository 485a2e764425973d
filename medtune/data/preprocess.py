"""Preprocessing as pure functions on numpy arrays (group convention, DESIGN section 3).

z-score each modality over its nonzero voxels, crop to the nonzero bounding box, pad
to a multiple of the patch size. Images are ``(M, *S)`` with modalities first and any
number of spatial dims ``S``; masks and labels are ``(*S)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

BBox = tuple[tuple[int, int], ...]
"""A box as ``((start, stop), ...)``, one half-open range per spatial axis."""


ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, "torch.Tensor")


def zscore_nonzero(image: ArrayOrTensor, eps: float = 1e-8) -> ArrayOrTensor:
    """Normalise each modality to mean 0 / std 1 over its own nonzero voxels.

    The one intensity normalisation of medtune: volumes (``(M, H, W, D)`` from the
    cache) and 2D images (``(C, H, W)`` VQA items) alike. Statistics are taken in
    float64 with the population std.

    Args:
        image: ``(M, *S)`` numpy array or torch tensor, modalities/channels first; zero
            marks background (skull-stripped MRI, the black border of a slice).
    Returns:
        ``(M, *S)`` float32, of the input's kind (a tensor comes back as a tensor on the
        input's device); background stays exactly 0. A modality whose std is at most
        ``eps`` is only shifted by its mean (a single distinct nonzero value becomes 0).
    """
    if not isinstance(image, np.ndarray):
        import torch  # only a caller holding a tensor pays for importing torch

        if not isinstance(image, torch.Tensor):
            raise TypeError(f"zscore_nonzero takes a numpy array or a torch tensor, got {type(image).__name__}")
        return torch.from_numpy(zscore_nonzero(image.detach().cpu().numpy(), eps)).to(image.device)
    out = np.zeros(image.shape, dtype=np.float32)
    for m in range(image.shape[0]):
        modality = image[m]
        nonzero = modality != 0
        values = modality[nonzero].astype(np.float64)
        if values.size == 0:
            continue
        mean = values.mean()
        std = values.std()
        scale = 1.0 / std if std > eps else 1.0
        out[m][nonzero] = ((values - mean) * scale).astype(np.float32)
    return out


def preprocess(image: np.ndarray) -> np.ndarray:
    """The intensity normalisation medtune applies to every image: :func:`zscore_nonzero`."""
    return zscore_nonzero(image)


def foreground_mask(image: np.ndarray, mode: Literal["all", "any"] = "all") -> np.ndarray:
    """Voxels that are nonzero in all (or any) modalities.

    FreMAE masks "foreground pixels (all modalities nonzero)", hence ``"all"``; the
    crop box uses ``"any"`` so that no modality loses signal.

    Args:
        image: ``(M, *S)``.
    Returns:
        ``(*S)`` bool.
    """
    nonzero = image != 0
    if mode == "all":
        return nonzero.all(axis=0)
    if mode == "any":
        return nonzero.any(axis=0)
    raise ValueError(f"foreground mode must be 'all' or 'any', got {mode!r}")


def nonzero_bbox(mask: np.ndarray) -> BBox:
    """Smallest box holding every nonzero element of ``mask`` ``(*S)``.

    An all-zero mask gives the full extent (nothing to crop away).
    """
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other) if other else mask)
        if hits.size == 0:
            return tuple((0, n) for n in mask.shape)
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop_to_bbox(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """``array[..., start:stop, ...]`` over its last ``len(bbox)`` axes (a view)."""
    index = (Ellipsis,) + tuple(slice(start, stop) for start, stop in bbox)
    return array[index]


def paste_from_bbox(
    cropped: np.ndarray, bbox: BBox, spatial_shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Inverse of :func:`crop_to_bbox`: put ``cropped (..., *s)`` back into ``(..., *S)``.

    Used to write a prediction made on a cropped volume with the input's full shape.
    """
    lead = cropped.shape[: cropped.ndim - len(bbox)]
    out = np.full(lead + tuple(spatial_shape), fill, dtype=cropped.dtype)
    out[(Ellipsis,) + tuple(slice(start, stop) for start, stop in bbox)] = cropped
    return out


def crop_foreground(
    image: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, BBox]:
    """Crop ``image (M, *S)`` (and ``label (*S)``) to the box of voxels nonzero in any modality."""
    bbox = nonzero_bbox(foreground_mask(image, "any"))
    cropped_label = crop_to_bbox(label, bbox) if label is not None else None
    return crop_to_bbox(image, bbox), cropped_label, bbox


def pad_to_multiple(
    array: np.ndarray, multiple: int | Sequence[int], axes: Sequence[int], value: float = 0
) -> np.ndarray:
    """Pad ``array`` at the end of each of ``axes`` up to a multiple of ``multiple``.

    Padding goes at the end so that ``padded[:n]`` recovers the original along each
    axis. ``multiple`` is one int or one per axis.
    """
    multiples = [multiple] * len(axes) if isinstance(multiple, int) else list(multiple)
    if len(multiples) != len(axes):
        raise ValueError(f"{len(multiples)} multiples given for {len(axes)} axes")
    widths = [(0, 0)] * array.ndim
    for axis, m in zip(axes, multiples):
        if m < 1:
            raise ValueError(f"multiple must be >= 1, got {m}")
        size = array.shape[axis]
        widths[axis] = (0, (-size) % m)
    if all(after == 0 for _, after in widths):
        return array
    return np.pad(array, widths, mode="constant", constant_values=value)
