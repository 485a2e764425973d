"""Whole-volume inference: sliding window (MONAI), flip TTA, label maps, NIfTI writing.

The path of a case through prediction mirrors training (the cache)::

    volume = load_case(case)                            # image (M, H, W, D) as read, its affine
    prepared = plan.prepare(volume.image, volume.affine)  # training grid, foreground crop, normalised
    probs = sliding_window_probs(model, prepared.image)   # (K, h, w, d), softmax averaged over windows/flips
    full = paste_probabilities(probs, prepared)           # (K, H', W', D'): background outside the box
    labels = labels_on_input(full, prepared.grid, values) # argmax, nearest back to the input grid
    probs_in = probabilities_on_input(full, prepared.grid)  # linear back to the input grid
    write_label_map(labels, out_path, volume.affine, volume.header)   # the input's affine and header

``plan`` is the run's :class:`~medtune.data.plan.DataPlan` (orientation, spacing,
intensity statistics); mapping back is exact where the training grid only reoriented
the input.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

log = logging.getLogger(__name__)


def flip_axes_for_tta(spatial_dims: int = 3) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *S)`` tensor, the empty one first."""
    axes = tuple(range(2, 2 + spatial_dims))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


@torch.no_grad()
def sliding_window_probs(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    tta: bool = False,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class probabilities of a whole volume.

    Args:
        model: a segmenter with ``forward_logits((B, M, *roi) -> (B, K, *roi))``.
        image: ``(M, H, W, D)`` preprocessed volume (any size; padded as needed).
        roi_size: window ``(h, w, t)``; ``h, w`` = the backbone's slice size.
        overlap: fraction of overlap between neighbouring windows.
        sw_batch_size: windows per forward.
        tta: also average over flips of every subset of the spatial axes (8 passes in 3D).
        mode: MONAI blend mode, "gaussian" or "constant".
    Returns:
        ``(K, H, W, D)`` float32 softmax probabilities, on the CPU.
    """
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else "cpu")
    volume = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    volume = volume.to(device=device, dtype=torch.float32)[None]  # (1, M, H, W, D)
    predictor = getattr(model, "forward_logits", model)

    def window_probs(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(predictor(x).float(), dim=1)

    flips = flip_axes_for_tta(volume.ndim - 2) if tta else [()]
    total = None
    for axes in flips:
        flipped = volume.flip(axes) if axes else volume
        probs = sliding_window_inference(
            flipped, tuple(roi_size), sw_batch_size, window_probs, overlap=overlap, mode=mode
        )
        probs = torch.as_tensor(probs)
        probs = probs.flip(axes) if axes else probs
        total = probs if total is None else total + probs
    return (total / len(flips))[0].cpu()


def paste_probabilities(probs: torch.Tensor | np.ndarray, prepared) -> np.ndarray:
    """``probs (K, h, w, d)`` of the cropped case -> ``(K, *shape)`` on the whole training
    grid, background (class 0) with probability 1 outside the crop box."""
    from medtune.data.preprocess import paste_from_bbox

    probs = np.asarray(probs, dtype=np.float32)
    full = paste_from_bbox(probs, prepared.bbox, prepared.shape, fill=0.0)
    outside = np.ones(prepared.shape, dtype=bool)
    outside[tuple(slice(a, b) for a, b in prepared.bbox)] = False
    full[0][outside] = 1.0
    return full


def labels_on_input(full_probs: np.ndarray, grid, label_values: Sequence[int]) -> np.ndarray:
    """Argmax on the training grid, mapped back to the input's grid by nearest neighbour,
    in the dataset's label values: ``(K, *S')`` -> ``(H, W, D)`` uint8."""
    from medtune.data.geometry import to_input_grid

    index = np.argmax(full_probs, axis=0).astype(np.uint8)
    back = to_input_grid(index[None], grid, mode="nearest")[0]
    return np.asarray(label_values, dtype=np.uint8)[back]


def probabilities_on_input(full_probs: np.ndarray, grid) -> np.ndarray:
    """Class probabilities mapped back to the input's grid (linear): ``(K, *S')`` -> ``(K, H, W, D)``."""
    from medtune.data.geometry import to_input_grid

    return np.asarray(to_input_grid(full_probs, grid, mode="bilinear"), dtype=np.float32)


def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    affine: np.ndarray | None,
    plan,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    tta: bool = False,
    device: torch.device | str | None = None,
):
    """Raw image ``(M, H, W, D)`` -> ``(probabilities (K, *S') on the whole training grid,
    the case's grid)`` (``affine`` None: the image is on the training grid already)."""
    prepared = plan.prepare(image, affine)
    probs = sliding_window_probs(
        model, prepared.image, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, device=device
    )  # (K, h, w, d)
    return paste_probabilities(probs, prepared), prepared.grid


def predict_label_map(
    model: torch.nn.Module,
    image: np.ndarray,
    label_values: Sequence[int],
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    tta: bool = False,
    device: torch.device | str | None = None,
    affine: np.ndarray | None = None,
    plan=None,
) -> np.ndarray:
    """Raw image ``(M, H, W, D)`` -> label map ``(H, W, D)`` uint8 in the dataset's values.

    Prepares the case as training did (``plan``; None: z-score per channel on the
    image's own grid), predicts the foreground box by sliding window, pastes it back
    (background outside the box) and maps it back to the input's grid.
    ``label_values[k]`` is the value of class ``k``.
    """
    from medtune.data.plan import DataPlan

    plan = plan if plan is not None else DataPlan.untouched(image.shape[0])
    full, grid = predict_probabilities(
        model, image, affine, plan, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, device=device
    )
    return labels_on_input(full, grid, label_values)


def write_label_map(
    labels: np.ndarray, path: str | Path, affine: np.ndarray, header: nib.Nifti1Header | None = None
) -> Path:
    """Write ``labels (H, W, D)`` (uint8, dataset values) as NIfTI with the input's geometry."""
    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    return _save_nifti(img, Path(path))


def write_probabilities(
    probs: np.ndarray, path: str | Path, label_values: Sequence[int], affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write class probabilities ``(K, H, W, D)`` on the input grid: ``.npz`` (float16
    ``probabilities`` (K, H, W, D) in the input's array order, and the ``label_values``
    of the K classes, as nnU-Net's ``--save_probabilities``) or ``.nii.gz`` (a 4D float32
    NIfTI ``(H, W, D, K)`` with the input's affine and header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".npz"):
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, probabilities=np.asarray(probs, dtype=np.float16),
                            label_values=np.asarray(label_values, dtype=np.int64))
        tmp.replace(path)
        return path
    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.moveaxis(np.asarray(probs, dtype=np.float32), 0, -1), affine, header)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1, 0)
    img.header.set_intent("vector", (), "class probabilities")
    return _save_nifti(img, path)


def _save_nifti(img: nib.Nifti1Image, path: Path) -> Path:
    # a temporary name in the same folder, then rename (no half-written NIfTI)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def nifti_output_name(case_id: str) -> str:
    return f"{case_id}.nii.gz"


PROBABILITY_FORMATS = {"npz": ".npz", "nifti": "_probabilities.nii.gz"}


def probabilities_output_name(case_id: str, fmt: str = "npz") -> str:
    """``<case>.npz`` (nnU-Net's name) or ``<case>_probabilities.nii.gz``."""
    return f"{case_id}{PROBABILITY_FORMATS[fmt]}"
