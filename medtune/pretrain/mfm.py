"""MFM baseline (Masked Frequency Modeling, Xie et al., ICLR 2023), 2D or 3D.

Steps: ``corrupt_input`` (remove the low or the high band of the image spectrum, a
circle of radius 16 bins at 224 px scaled with the image side; the low set is
``dx^2 + dy^2 < r^2``, 793 bins at 224 px), ``forward_encoder`` (the backbone's last
stage), ``forward_decoder`` (SimMIM-style 1x1 conv + pixel shuffle), ``forward_loss``
(the official criterion: the plain frequency distance ``|F_pred - F_true|``, loss_gamma
1 and no weight matrix, averaged over the *removed* bins, channels and patches: the
model is asked to recover what the corruption took away).

The official code clamps the corrupted image to [0, 1] (natural images); medtune's
inputs are z-scored volumes, so nothing is clamped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medtune.pretrain.frequency import (
    apply_band,
    band_mask,
    focal_weight,
    frequency_distance,
    inverse_spectrum,
    mfm_radius,
    spectrum,
)
from medtune.pretrain.simmim import PixelShuffleHead


class MFM(nn.Module):
    """Masked frequency modeling around a backbone.

    Args:
        backbone: a :class:`medtune.models.Backbone`.
        radius: band radius in bins; None = 16 at 224 px, scaled with the smallest side.
        filter_kind: ``"circle"`` (MFM) or ``"square"``.
        band: the band that is removed: ``"low"``, ``"high"`` or ``"random"`` (per sample).
        loss_gamma: exponent of the frequency distance (official 1; 2 = squared).
        focal_weight: weight the distance by the focal frequency weight (official: no).
        focal_alpha: exponent of the focal weight (with ``focal_weight`` only).

    ``forward(batch)`` with ``batch["image"]`` ``(B, M, *S)`` -> ``{"loss",
    "removed_low"}`` (fraction of samples whose low band was removed).
    """

    def __init__(
        self,
        backbone: nn.Module,
        radius: float | None = None,
        filter_kind: str = "circle",
        band: str = "random",
        loss_gamma: float = 1.0,
        focal_weight: bool = False,
        focal_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = int(backbone.spatial_dims)
        self.radius = radius
        self.filter_kind = filter_kind
        self.band = band
        self.loss_gamma = loss_gamma
        self.focal_weight = focal_weight
        self.focal_alpha = focal_alpha
        self.decoder = PixelShuffleHead(
            backbone.feature_channels[-1], backbone.in_chans, backbone.feature_strides[-1], self.spatial_dims
        )

    def removed_bins(self, images: Tensor) -> Tensor:
        """Which bins each sample loses: ``(B, M, *S) -> (B, *S)`` bool (centred spectrum)."""
        size = images.shape[2:]
        radius = mfm_radius(size) if self.radius is None else self.radius
        low = band_mask(size, radius, self.filter_kind, "low", images.device)  # (*S)
        batch = images.shape[0]
        if self.band == "random":
            remove_low = torch.rand(batch, device=images.device) < 0.5
        else:
            remove_low = torch.full((batch,), self.band == "low", device=images.device)
        remove_low = remove_low.view(batch, *([1] * len(size)))
        return torch.where(remove_low, low, ~low)  # (B, *S)

    def corrupt_input(self, images: Tensor, removed: Tensor) -> Tensor:
        """The image with the ``removed`` bins of its spectrum zeroed: ``(B, M, *S)``."""
        spec = spectrum(images, self.spatial_dims)  # (B, M, *S, 2)
        kept = apply_band(spec, (~removed).unsqueeze(1))
        return inverse_spectrum(kept, self.spatial_dims).to(images.dtype)

    def forward_encoder(self, corrupted: Tensor) -> Tensor:
        """Last stage map ``(B, C, *S/stride_last)``."""
        return self.backbone.forward_stages(corrupted)[-1]

    def forward_decoder(self, latent: Tensor) -> Tensor:
        """``(B, C, *S/stride_last) -> (B, M, *S)``."""
        return self.decoder(latent)

    def forward_loss(self, images: Tensor, pred: Tensor, removed: Tensor) -> Tensor:
        """Frequency distance ``|F_pred - F_true|^gamma`` averaged over the removed bins and
        channels (the official criterion); ``focal_weight`` multiplies it by the focal
        weight computed over the whole spectrum, as MFM's ``with_matrix`` option."""
        selected = removed.unsqueeze(1)  # (B, 1, *S)
        pred_spec = spectrum(pred, self.spatial_dims)  # (B, M, *S, 2)
        target_spec = spectrum(images, self.spatial_dims)
        distance = frequency_distance(pred_spec, target_spec, self.loss_gamma)  # (B, M, *S)
        if self.focal_weight:
            distance = focal_weight(pred_spec.detach(), target_spec, self.focal_alpha) * distance
        count = selected.sum() * images.shape[1]
        return (distance * selected).sum() / count.clamp_min(1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        removed = self.removed_bins(images)
        pred = self.forward_decoder(self.forward_encoder(self.corrupt_input(images, removed)))
        loss = self.forward_loss(images, pred, removed)
        centre = removed[(slice(None),) + tuple(n // 2 for n in removed.shape[1:])]  # (B,) DC removed?
        return {"loss": loss, "removed_low": centre.float().mean().detach()}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> dict[str, Tensor]:
        """``image``, ``masked`` (the corrupted input) and ``prediction``, ``(B, M, *S)``."""
        images = batch["image"]
        removed = self.removed_bins(images)
        corrupted = self.corrupt_input(images, removed)
        return {"image": images, "masked": corrupted, "prediction": self.forward_decoder(self.forward_encoder(corrupted))}


__all__ = ["MFM"]
