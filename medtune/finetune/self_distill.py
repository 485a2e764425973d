"""Masked-input self-distillation for volumetric (and slice-wise) segmentation finetuning.

The CM-MaskSD consistency term (DESIGN section 6) used as a regulariser: mask part of the
input (whole slices, or patches), run the *same* network on it, and pull the masked
prediction towards the stop-gradient prediction on the full input. No parameters are
added; the masked input is filled with a constant (0 = background of z-scored volumes).

API (what ``medtune finetune --self-distill`` wires in)::

    from medtune.finetune.self_distill import SelfDistillConfig, SelfDistillation

    sd = SelfDistillation(SelfDistillConfig(ratio=0.25, mode="patches", patch_size=16))
    logits = model(x)                                  # (B, K, *S), full input
    loss = seg_loss(logits, y) + sd(model, x, logits)  # adds weight * distill term

Pure building blocks, usable on their own:

- ``mask_slices_or_patches(volume, ratio, mode, patch_size, fill_value, generator)``
  -> ``(masked_volume, mask)``; ``volume (B, C, *S)`` with S = (H, W) or (H, W, D),
  ``mask (B, *S)`` bool, True where the input was replaced by ``fill_value``.
  ``mode="slices"`` masks ``round(ratio * D)`` whole slices along the last (slice) axis
  of each sample; ``mode="patches"`` masks ``round(ratio * L)`` of the L patches of a
  ``patch_size`` grid (edge patches are cropped when S is not a multiple).
- ``distill_loss(student_logits, teacher_logits, kind, activation)`` -> scalar.
  The teacher is detached inside (stop-gradient). ``activation="softmax"`` treats the
  channel axis as classes, ``"sigmoid"`` as independent labels (e.g. BraTS WT/TC/ET).
  ``kind="kl"``: KL(teacher || student), per voxel, averaged (summed over classes for
  softmax). ``kind="bce"``: cross-entropy minus the teacher's entropy, which equals the
  KL divergence value, so it is exactly 0 when the branches agree (gradients are those
  of plain soft-target BCE/CE). ``kind="mse"``: mean squared error of probabilities.

The term is only computed in training mode; ``SelfDistillation`` returns 0 otherwise.
Models that return deep-supervision lists should pass the full-resolution logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from medtune.errors import ConfigError

MASK_MODES = ("slices", "patches")
DISTILL_KINDS = ("kl", "bce", "mse")
ACTIVATIONS = ("softmax", "sigmoid")


@dataclass
class SelfDistillConfig:
    """Masked-input self-distillation for segmentation finetuning."""

    ratio: float = 0.25  # fraction of slices / patches masked per sample, in [0, 1)
    mode: str = "patches"  # "patches" (any spatial dims) or "slices" (3D only, last axis)
    patch_size: int = 16  # patch edge in voxels for mode="patches" (same on every axis)
    fill_value: float = 0.0  # what masked voxels become (0 = background after z-scoring)
    weight: float = 1.0  # lambda: the term is weight * distill_loss
    kind: str = "kl"  # "kl", "bce" (entropy-corrected, = KL) or "mse"
    activation: str = "softmax"  # "softmax" (classes) or "sigmoid" (independent labels)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.mode not in MASK_MODES:
            raise ValueError(f"mode must be one of {MASK_MODES}, got '{self.mode}'")
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"kind must be one of {DISTILL_KINDS}, got '{self.kind}'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got '{self.activation}'")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")


def _random_topk_mask(
    batch: int, length: int, num_masked: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, L) bool with exactly ``num_masked`` True entries per row, chosen uniformly."""
    noise = torch.rand(batch, length, device=device, generator=generator)  # [B, L]
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each entry within its row
    return ranks < num_masked


def mask_slices_or_patches(
    volume: torch.Tensor,
    ratio: float,
    mode: str = "patches",
    patch_size: int | Sequence[int] = 16,
    fill_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random ``ratio`` of slices or patches of each sample by ``fill_value``.

    Args:
        volume: ``(B, C, *S)``, S = (H, W) or (H, W, D); slices lie along the last axis.
        ratio: fraction of slices (of D) or patches (of the patch grid) masked per sample;
            the count is ``round(ratio * n)``.
        mode: ``"slices"`` (needs 3 spatial dims) or ``"patches"``.
        patch_size: patch edge per spatial axis (an int for all axes).
        fill_value: value written into masked voxels, for every channel.
        generator: optional RNG for reproducible masks.

    Returns:
        ``(masked_volume, mask)``: ``masked_volume`` like ``volume``; ``mask (B, *S)``
        bool, True where masked. The input is not modified.
    """
    if mode not in MASK_MODES:
        raise ConfigError(f"self-distillation mask mode must be one of {MASK_MODES}, got '{mode}'")
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"self-distillation mask ratio must be in [0, 1), got {ratio}")
    batch, spatial = volume.shape[0], tuple(volume.shape[2:])
    if mode == "slices":
        if len(spatial) != 3:
            raise ConfigError(
                f"mask mode 'slices' needs a volume (B, C, H, W, D), got shape {tuple(volume.shape)}"
            )
        depth = spatial[-1]
        slice_mask = _random_topk_mask(batch, depth, round(ratio * depth), volume.device, generator)
        mask = slice_mask[:, None, None, :].expand(batch, *spatial)  # [B, H, W, D]
    else:
        sizes = (patch_size,) * len(spatial) if isinstance(patch_size, int) else tuple(patch_size)
        if len(sizes) != len(spatial):
            raise ConfigError(f"patch_size {patch_size} does not match {len(spatial)} spatial dims")
        grid = tuple(math.ceil(s / p) for s, p in zip(spatial, sizes))
        num_patches = math.prod(grid)
        patch_mask = _random_topk_mask(
            batch, num_patches, round(ratio * num_patches), volume.device, generator
        ).view(batch, *grid)  # [B, *grid]
        for axis, size in enumerate(sizes):
            patch_mask = patch_mask.repeat_interleave(size, dim=axis + 1)
        mask = patch_mask[(slice(None),) + tuple(slice(0, s) for s in spatial)]  # [B, *S]
    masked = volume.masked_fill(mask.unsqueeze(1), fill_value)
    return masked, mask


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "kl",
    activation: str = "softmax",
) -> torch.Tensor:
    """Consistency between a masked branch and the stop-gradient full-input prediction.

    Args:
        student_logits: ``(B, K, *S)`` logits of the masked branch (gets gradients).
        teacher_logits: same shape, logits on the full input; detached here.
        kind: ``"kl"`` / ``"bce"`` (both = KL(teacher || student), 0 when they agree),
            or ``"mse"`` on probabilities.
        activation: ``"softmax"`` over K, or ``"sigmoid"`` per channel.

    Returns:
        scalar: mean over batch and voxels (softmax: summed over classes; sigmoid: mean
        over channels too).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if kind not in DISTILL_KINDS:
        raise ConfigError(f"distill kind must be one of {DISTILL_KINDS}, got '{kind}'")
    teacher_logits = teacher_logits.detach()
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.float()
    if activation == "softmax":
        log_p_student = F.log_softmax(student_logits, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits, dim=1)
        p_teacher = log_p_teacher.exp()
        if kind == "mse":
            return (log_p_student.exp() - p_teacher).pow(2).sum(dim=1).mean()
        # KL and entropy-corrected CE are the same number: sum p_t (log p_t - log p_s).
        return (p_teacher * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    if activation == "sigmoid":
        return _binary_distill_loss(student_logits, teacher_logits, kind)
    raise ConfigError(f"distill activation must be one of {ACTIVATIONS}, got '{activation}'")


def _binary_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element binary consistency on sigmoid probabilities; teacher detached.

    ``"bce"`` and ``"kl"`` give BCE(p_s; p_t) - H(p_t) = KL(Bern(p_t) || Bern(p_s)), which
    is 0 exactly where p_s = p_t and has the gradient of soft-target BCE. Any shape.
    """
    teacher_logits = teacher_logits.detach().float()
    student_logits = student_logits.float()
    p_teacher = torch.sigmoid(teacher_logits)
    if kind == "mse":
        return (torch.sigmoid(student_logits) - p_teacher).pow(2).mean()
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits, p_teacher, reduction="none")
    teacher_entropy = F.binary_cross_entropy_with_logits(teacher_logits, p_teacher, reduction="none")
    return (cross_entropy - teacher_entropy).mean()


class SelfDistillation:
    """Adds ``weight * distill_loss(model(masked x), stop_grad(full logits))`` to training.

    Holds no parameters: the masked branch is the same ``model`` on a masked input.
    Call it as ``sd(model, x, full_logits)``; ``model`` may be any callable
    ``(B, C, *S) -> (B, K, *S)``. Returns a 0-dim tensor (0 outside training mode or
    when ``ratio == 0`` or ``weight == 0``).
    """

    def __init__(self, cfg: SelfDistillConfig | None = None, generator: torch.Generator | None = None):
        self.cfg = cfg or SelfDistillConfig()
        self.generator = generator

    def __call__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        volume: torch.Tensor,
        full_logits: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        training = getattr(model, "training", True)
        if not training or cfg.ratio == 0.0 or cfg.weight == 0.0:
            return full_logits.new_zeros(())
        masked, _ = mask_slices_or_patches(
            volume, cfg.ratio, cfg.mode, cfg.patch_size, cfg.fill_value, self.generator
        )
        student_logits = model(masked)
        return cfg.weight * distill_loss(student_logits, full_logits, cfg.kind, cfg.activation)
