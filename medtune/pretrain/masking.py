"""Masking strategies of the pretraining objectives, for 2D and 3D inputs.

- :func:`pixel_masking` (FreMAE): a fraction of the *foreground* pixels (voxels) of each
  sample is replaced by a learnable per-modality token, then the masked input gets a
  random intensity scale and shift.
- :func:`random_masking` (MAE): a random subset of patches is kept, by sorting noise;
  returns the kept ids, the ids that restore the original order, and the binary mask.
- :func:`block_masking` (SimMIM): masked patches come in square (cubic) blocks.

All are vectorised over the batch (one sort per call, no loop over samples). Spatial
axes are the trailing ones: an image is ``(B, M, *S)``, a foreground ``(B, *S)``, a patch
grid ``(B, *G)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

MaskScope = Literal["sample", "batch"]
JitterShape = Literal["sample", "column"]


def foreground_of(image: Tensor) -> Tensor:
    """Foreground as in FreMIM: pixels where every modality is nonzero.

    ``(B, M, *S) -> (B, *S)`` bool.
    """
    return (image != 0).all(dim=1)


def _select_fraction(candidates: Tensor, fraction: float, generator: torch.Generator | None) -> Tensor:
    """Pick ``floor(fraction * n_i)`` of the ``n_i`` True entries of each row, uniformly.

    ``candidates (R, N) bool -> (R, N) bool`` (a subset of ``candidates``).
    """
    rows, _ = candidates.shape
    noise = torch.rand(candidates.shape, device=candidates.device, generator=generator)
    # Non-candidates get noise 2 > any candidate's, so they sort last and are never picked.
    noise = noise.masked_fill(~candidates, 2.0)
    count = (candidates.sum(1) * fraction).floor().long()  # (R,)
    sorted_noise = noise.sort(dim=1).values  # (R, N)
    threshold = sorted_noise.gather(1, (count - 1).clamp_min(0).unsqueeze(1))  # (R, 1)
    return (noise <= threshold) & (count > 0).unsqueeze(1)


def pixel_masking(
    image: Tensor,
    foreground: Tensor,
    mask_ratio: float,
    mask_token: Tensor,
    scope: MaskScope = "sample",
    jitter: float = 0.1,
    generator: torch.Generator | None = None,
    jitter_shape: JitterShape = "sample",
) -> tuple[Tensor, Tensor]:
    """FreMAE's per-pixel foreground masking with intensity jitter.

    Args:
        image: ``(B, M, *S)`` input, ``M`` modalities.
        foreground: ``(B, *S)`` bool; only these pixels can be masked.
        mask_ratio: fraction of each sample's foreground pixels to mask
            (``floor(mask_ratio * n_foreground)`` pixels exactly).
        mask_token: ``(M,)`` learnable value written into masked pixels, per modality.
        scope: ``"sample"`` draws the masked set per sample (each sample loses the same
            fraction of its foreground); ``"batch"`` draws it over the whole batch, as the
            official FreMIM code does.
        jitter: the masked input is multiplied by ``U(1 - jitter, 1 + jitter)`` and shifted
            by ``U(-jitter, jitter)``; 0 disables it.
        jitter_shape: ``"sample"``: one draw per (sample, modality); ``"column"``: one per
            (sample, modality, position along the last spatial axis), i.e. ``(B, M, 1, W)``
            for slices, the shape the official FreMIM code draws (``(B, M, 1, ..., 1, S_last)``
            in 3D).

    Returns:
        ``masked`` ``(B, M, *S)`` (differentiable w.r.t. ``mask_token``) and
        ``mask`` ``(B, *S)`` bool, True where a pixel was replaced.
    """
    if image.shape[:1] + image.shape[2:] != foreground.shape:
        raise ValueError(
            f"pixel_masking: image {tuple(image.shape)} and foreground {tuple(foreground.shape)} "
            "do not match (expected (B, M, *S) and (B, *S))"
        )
    if scope not in ("sample", "batch"):
        raise ValueError(f"mask scope must be 'sample' or 'batch', got {scope!r}")
    if jitter_shape not in ("sample", "column"):
        raise ValueError(f"jitter shape must be 'sample' or 'column', got {jitter_shape!r}")
    batch, modalities = image.shape[:2]
    rows = foreground.reshape(batch, -1) if scope == "sample" else foreground.reshape(1, -1)
    mask = _select_fraction(rows.bool(), mask_ratio, generator).view_as(foreground)  # (B, *S)

    token = mask_token.to(image.dtype).view(1, modalities, *([1] * (image.ndim - 2)))
    masked = torch.where(mask.unsqueeze(1), token, image)  # (B, M, *S)
    if jitter > 0:
        shape = (batch, modalities) + (1,) * (image.ndim - 2)
        if jitter_shape == "column":
            shape = shape[:-1] + (image.shape[-1],)
        uniform = torch.rand((2, *shape), device=image.device, generator=generator)
        scale = 1.0 - jitter + 2.0 * jitter * uniform[0]
        shift = -jitter + 2.0 * jitter * uniform[1]
        masked = masked * scale.to(image.dtype) + shift.to(image.dtype)
    return masked, mask


@dataclass
class PatchMask:
    """Result of :func:`random_masking` for ``B`` samples of ``L`` patches.

    Attributes:
        ids_keep: ``(B, L_keep)`` indices of the visible patches (in shuffled order).
        ids_restore: ``(B, L)`` indices that put ``[visible, masked]`` back into the
            original patch order (``gather`` along the patch axis).
        mask: ``(B, L)`` float, 1 for masked patches, 0 for visible, original order.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> PatchMask:
    """MAE's per-sample random patch masking: keep ``int(L * (1 - mask_ratio))`` patches,
    chosen by sorting uniform noise (argsort of noise = random permutation)."""
    len_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # (B, L)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first len_keep are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, L_keep)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = mask.gather(1, ids_restore)  # (B, L), back to the original order
    return PatchMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_patches(tokens: Tensor, ids: Tensor) -> Tensor:
    """``tokens (B, L, C)``, ``ids (B, K)`` -> ``(B, K, C)`` (the tokens at ``ids``)."""
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def upsample_mask(mask: Tensor, factor: int | Sequence[int]) -> Tensor:
    """Repeat each cell of a grid mask: ``(B, *G) -> (B, *(G * factor))``."""
    spatial = mask.ndim - 1
    factors = [factor] * spatial if isinstance(factor, int) else list(factor)
    for axis, f in enumerate(factors, start=1):
        mask = mask.repeat_interleave(f, dim=axis)
    return mask


def block_masking(
    batch_size: int,
    grid: Sequence[int],
    mask_ratio: float,
    block_size: int = 1,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SimMIM's block-wise masking on a patch grid.

    The grid is tiled by blocks of ``block_size`` patches per axis; ``ceil(n_blocks *
    mask_ratio)`` blocks are masked per sample (exactly, by sorting noise), and each masked
    block masks all its patches (blocks cut by the grid border are cropped).

    Args:
        grid: patch grid ``G``, e.g. ``(H/p, W/p)`` or ``(H/p, W/p, D/p)``.

    Returns:
        ``(B, *G)`` bool, True where a patch is masked.
    """
    coarse = [math.ceil(g / block_size) for g in grid]
    num_blocks = math.prod(coarse)
    count = math.ceil(num_blocks * mask_ratio)
    noise = torch.rand(batch_size, num_blocks, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # (B, n_blocks): rank of each block
    blocks = (ranks < count).view(batch_size, *coarse)  # (B, *G / block_size)
    mask = upsample_mask(blocks, block_size)
    crop = (slice(None),) + tuple(slice(0, g) for g in grid)
    return mask[crop]


__all__ = [
    "foreground_of",
    "pixel_masking",
    "PatchMask",
    "random_masking",
    "gather_patches",
    "upsample_mask",
    "block_masking",
]
