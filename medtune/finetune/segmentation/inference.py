"""Whole-volume inference: sliding window (MONAI), flip TTA, label maps, NIfTI writing.

The path of a case through prediction mirrors training::

    volume = load_case(case)                        # image (M, H, W, D), raw values
    image = preprocess(volume.image)                # z-score per modality over nonzero voxels
    cropped, _, bbox = crop_foreground(image)       # (M, h, w, d)
    probs = sliding_window_probs(model, cropped)    # (K, h, w, d), softmax averaged over windows/flips
    labels = spec.to_values(probs.argmax(0))        # (h, w, d) dataset values (BraTS 0/1/2/4)
    full = paste_from_bbox(labels, bbox, shape)     # (H, W, D), background outside the box
    write_label_map(full, volume, out_path)         # the input's affine and header
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


def write_label_map(
    labels: np.ndarray, path: str | Path, affine: np.ndarray, header: nib.Nifti1Header | None = None
) -> Path:
    """Write ``labels (H, W, D)`` (uint8, dataset values) as NIfTI with the input's geometry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    # Write to a temporary name in the same folder, then rename (no half-written NIfTI).
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def nifti_output_name(case_id: str) -> str:
    return f"{case_id}.nii.gz"


def predict_label_map(
    model: torch.nn.Module,
    image: np.ndarray,
    label_values: Sequence[int],
    roi_size: Sequence[int],
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    tta: bool = False,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Raw image ``(M, H, W, D)`` -> label map ``(H, W, D)`` uint8 in the dataset's values.

    Preprocesses like training (z-score over nonzero voxels, crop to the nonzero box),
    predicts the box by sliding window, and pastes it back into the full shape
    (background outside the box). ``label_values[k]`` is the value of class ``k``.
    """
    from medtune.data.preprocess import crop_foreground, paste_from_bbox, preprocess

    cropped, _, bbox = crop_foreground(preprocess(image))  # (M, h, w, d)
    probs = sliding_window_probs(
        model, cropped, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, device=device
    )  # (K, h, w, d)
    index = probs.argmax(0).numpy()
    values = np.asarray(label_values, dtype=np.uint8)[index]
    return paste_from_bbox(values, bbox, image.shape[1:], fill=0)
