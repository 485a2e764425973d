"""Slice-wise volumetric segmentation: a 2D backbone (+ adapters) and a decoder per slice.

Med-Tuning's model (DESIGN section 5): a volume ``(B, M, H, W, T)`` becomes ``B*T``
slices ``(B*T, M, H, W)``; the frozen backbone (with adapters that mix the ``T`` slices)
gives stage features; a decoder (UperNet for plain ViT, U-Net style for hierarchical
backbones) gives per-slice logits, stacked back to ``(B, K, H, W, T)``. The loss is
softmax Dice + cross-entropy (MONAI ``DiceCELoss``).

Backbones with ``spatial_dims=3`` (MONAI SwinUNETR encoder) are run on the volume as
is, with a 3D decoder; the same class serves both.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from monai.losses import DiceCELoss
from torch import nn

from medtune.errors import ConfigError, DataError


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """``(B, M, H, W, T) -> (B*T, M, H, W)``, slices of one volume contiguous."""
    b, m, h, w, t = volume.shape
    return volume.permute(0, 4, 1, 2, 3).reshape(b * t, m, h, w)


def slices_to_volume(slices: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B*T, K, H, W) -> (B, K, H, W, T)``; inverse of :func:`volume_to_slices`."""
    bt, k, h, w = slices.shape
    return slices.reshape(batch, bt // batch, k, h, w).permute(0, 2, 3, 4, 1)


class SliceSegmenter(nn.Module):
    """Backbone (+ adapters) + decoder, applied slice-wise to volumes.

    Args:
        backbone: a :class:`medtune.models.Backbone`, possibly with adapters injected.
        decoder: maps ``backbone.forward_stages`` output and an output size to logits.
        num_classes: K, class indices ``0..K-1`` (background 0).
        lambda_dice, lambda_ce: weights of the Dice and cross-entropy terms.
        dice_include_background: whether the background class counts in Dice.
        slice_context: ``slice_context(backbone, T)`` -> a context manager during which
            the adapters know that consecutive groups of ``T`` images are one volume.
        self_distill: optional ``fn(model_fn, volume, logits) -> loss`` regulariser
            (:class:`medtune.finetune.self_distill.SelfDistillation`).

    ``forward_logits(volume (B, M, H, W, T)) -> (B, K, H, W, T)``;
    ``forward(batch)`` with ``batch["image"] (B, M, H, W, T)`` and ``batch["label"]
    (B, H, W, T)`` class indices -> ``{"loss", "dice_ce", ...}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module,
        num_classes: int,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        dice_include_background: bool = False,
        slice_context: Callable[[nn.Module, int], ContextManager] | None = None,
        self_distill: Callable | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = num_classes
        self.spatial_dims = int(getattr(backbone, "spatial_dims", 2))
        self.loss_fn = DiceCELoss(
            include_background=dice_include_background,
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        self._slice_context = slice_context
        self.self_distill = self_distill
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone block activations in backward instead of storing them.

        Uses the wrapped timm/MONAI network's own switch (``set_grad_checkpointing`` or
        MONAI's ``use_checkpoint``); trades one extra backbone forward for memory.
        """
        model = getattr(self.backbone, "model", self.backbone)
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(enable)
        elif hasattr(model, "use_checkpoint"):
            for module in model.modules():
                if hasattr(module, "use_checkpoint"):
                    module.use_checkpoint = enable
        else:
            raise ConfigError(f"backbone {type(model).__name__} has no gradient checkpointing switch")
        self.gradient_checkpointing = enable

    def slice_context(self, num_slices: int) -> ContextManager:
        if self._slice_context is None:
            return contextlib.nullcontext()
        return self._slice_context(self.backbone, num_slices)

    def forward_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, M, H, W, T) -> (B, K, H, W, T)`` logits."""
        if volume.ndim != 5:
            raise DataError(f"segmenter input has shape {tuple(volume.shape)}; expected (B, M, H, W, T)")
        if self.spatial_dims == 3:
            return self.decoder(self.backbone.forward_stages(volume), volume.shape[2:])
        batch, num_slices = volume.shape[0], volume.shape[-1]
        slices = volume_to_slices(volume)  # (B*T, M, H, W)
        with self.slice_context(num_slices):
            features = self.backbone.forward_stages(slices)  # [(B*T, C_i, H/s_i, W/s_i)]
        logits = self.decoder(features, slices.shape[2:])  # (B*T, K, H, W)
        return slices_to_volume(logits, batch)

    def compute_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Softmax Dice + CE of ``logits (B, K, *S)`` against class indices ``(B, *S)``."""
        return self.loss_fn(logits, label[:, None].long())

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        logits = self.forward_logits(image)
        seg_loss = self.compute_loss(logits, label)
        out = {"loss": seg_loss, "dice_ce": seg_loss.detach()}
        if self.self_distill is not None and self.training:
            distill = self.self_distill(self.forward_logits, image, logits)
            out["loss"] = seg_loss + distill
            out["self_distill"] = distill.detach()
        return out
