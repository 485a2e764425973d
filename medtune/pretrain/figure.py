"""``reconstruction.png``: what a pretraining objective sees and predicts.

One row per sample, one modality, the middle slice (last axis) for 3D. Columns depend on
what the objective's ``reconstruct(batch)`` returns:

- FreMAE: input | masked input | high band: target, prediction | low band (1/4 size):
  target, prediction | log-magnitude spectrum of the high band: target, prediction.
  Band panels are band-limited images (inverse spectra of the filtered target and
  prediction), which is how a researcher judges whether the detail (high) and the
  coarse intensity layout (low) are recovered; the spectrum panels show which bins the
  high-band loss sees (the zeroed central square is the low band).
- MAE / SimMIM / MFM: input | masked (or corrupted) input | prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from medtune.checkpoints.io import atomic_write

# (key in the reconstruct() dict, panel title); only keys present are drawn.
PANELS: tuple[tuple[str, str], ...] = (
    ("image", "input"),
    ("masked", "masked input"),
    ("target_high", "high band: target"),
    ("pred_high", "high band: predicted"),
    ("target_low", "low band: target"),
    ("pred_low", "low band: predicted"),
    ("target_high_spectrum", "log|F| high: target"),
    ("pred_high_spectrum", "log|F| high: predicted"),
    ("prediction", "predicted"),
)


def display_slice(volume: Tensor, spatial_dims: int) -> Tensor:
    """A 2D panel ``(H, W)`` from ``(H, W)`` or the middle slice of ``(H, W, D)``."""
    if spatial_dims == 3:
        volume = volume[..., volume.shape[-1] // 2]
    return volume.detach().float().cpu()


def save_reconstruction(
    path: str | Path,
    reconstruction: dict[str, Tensor],
    modality: int = 0,
    max_samples: int = 4,
    title: str | None = None,
) -> Path:
    """Write the reconstruction figure (PNG) atomically to ``path``.

    Args:
        reconstruction: the dict of an objective's ``reconstruct(batch)``; image-like
            entries are ``(B, M, *S)`` (any spatial size per entry), ``"mask"`` ``(B, *S)``.
        modality: which input channel to show.
        max_samples: rows drawn (the first samples of the batch).
        title: figure title.

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = reconstruction["image"]
    spatial_dims = image.ndim - 2
    panels = [(key, name) for key, name in PANELS if key in reconstruction]
    rows = min(max_samples, image.shape[0])
    fig, axes = plt.subplots(rows, len(panels), figsize=(2.0 * len(panels), 2.0 * rows + 0.4), squeeze=False)
    for row in range(rows):
        for col, (key, name) in enumerate(panels):
            ax = axes[row][col]
            panel = display_slice(reconstruction[key][row, modality], spatial_dims).numpy()
            # Input and prediction panels share the input's intensity range; band and
            # spectrum panels get their own (their values live on other scales).
            # (1st-99th percentile, so that a few extreme pixels do not grey out the rest).
            if key in ("image", "masked", "prediction"):
                reference = display_slice(image[row, modality], spatial_dims)
                vmin, vmax = float(reference.min()), float(reference.max())
            else:
                vmin, vmax = (float(q) for q in np.quantile(panel, [0.01, 0.99]))
            ax.imshow(panel, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if key == "masked" and "mask" in reconstruction:
                # masked pixels tinted red
                mask = display_slice(reconstruction["mask"][row].float(), spatial_dims).numpy()
                overlay = np.zeros((*mask.shape, 4))
                overlay[..., 0] = 1.0
                overlay[..., 3] = 0.45 * mask
                ax.imshow(overlay, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


__all__ = ["save_reconstruction", "display_slice", "PANELS"]
