"""FreMAE (published as FreMIM, WACV 2024): masked image modeling with frequency targets.

The steps, named as in the paper:

1. ``mask_input``: replace a fraction (0.25) of each sample's foreground pixels by a
   learnable per-modality token, then jitter intensities (scale and shift).
2. ``forward_encoder``: the backbone's stage maps of the masked input.
3. ``forward_decoder``: the multi-stage supervision decoder; a top-down path predicts a
   full-resolution image, a bottom-up path a 1/4-resolution image. ``decoder="light"``
   (:mod:`medtune.pretrain.decoder`) reads the stages of any backbone and, by default
   (``image_path``), the masked input through a full-resolution conv block, as the
   official network's ``encoder1``; its trunk is saved for finetuning (segmentation
   decoder ``multistage``); ``"unetr"`` (:mod:`medtune.pretrain.unetr_decoder`) is the
   official whole network: SwinUNETR's UNETR blocks (which also read the masked input)
   feed the two heads, and are saved for finetuning (decoder ``unetr``;
   :meth:`FreMAE.transferable_decoder`).
4. ``forward_loss``: focal frequency loss between the *high band* of the full-resolution
   prediction and of the (unmasked) input, and between the *low band* of the 1/4
   prediction and of the input average-pooled 4x. Total = 1.0 L_high + 1.3 L_low.
   ``target_norm`` (off by default, not in the paper) standardises each band's target
   per (sample, modality), as MAE's normalised pixels.

The targets cover the whole image, not only the masked pixels. One implementation
serves 2D slices ``(B, M, H, W)`` and 3D crops ``(B, M, H, W, D)`` (spectra over all
spatial axes). ``mask_mode="patch"`` is an MAE-style variant for ViT backbones: whole
patches are masked and only visible tokens are encoded; mask tokens are filled in
before the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtune.errors import ConfigError, DataError
from medtune.pretrain.decoder import MultiStageDecoder
from medtune.pretrain.frequency import (
    apply_band,
    band_focal_loss,
    band_mask,
    inverse_spectrum,
    spectrum,
    standardised_band_target,
)
from medtune.pretrain.mae import fill_mask_tokens, require_vit, vit_forward_visible
from medtune.pretrain.masking import PatchMask, foreground_of, pixel_masking, random_masking, upsample_mask

if TYPE_CHECKING:
    from medtune.pretrain.objectives import FreMAEConfig


def backbone_image_size(backbone: nn.Module) -> int:
    """The input side the backbone is configured for (``BackboneConfig.img_size``)."""
    config = getattr(backbone, "config", None)
    size = getattr(config, "img_size", None) or getattr(backbone, "img_size", None)
    if not size:
        raise ConfigError("FreMAE needs the backbone's img_size (build it with create_backbone)")
    return int(size)


def average_pool(x: Tensor, factor: int, spatial_dims: int) -> Tensor:
    """``(B, C, *S) -> (B, C, *S/factor)`` by averaging ``factor``-sided blocks."""
    if factor == 1:
        return x
    return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial_dims - 1](x, factor, factor)


@dataclass
class MaskedInput:
    """Output of :meth:`FreMAE.mask_input`.

    Attributes:
        image: ``(B, M, *S)`` what the encoder sees (patch mode: masked patches zeroed,
            for display only; the encoder drops their tokens instead).
        mask: ``(B, *S)`` bool, True at masked pixels.
        ratio: scalar, fraction of foreground pixels (pixel mode) or of patches (patch
            mode) that were masked.
        patch_mask: the :class:`PatchMask` in patch mode, else None.
    """

    image: Tensor
    mask: Tensor
    ratio: Tensor
    patch_mask: PatchMask | None = None


class FreMAE(nn.Module):
    """FreMAE around a backbone.

    Args:
        backbone: a :class:`medtune.models.Backbone` (``forward_stages``,
            ``feature_channels``, ``feature_strides``, ``spatial_dims``, ``in_chans``).
        cfg: a :class:`~medtune.pretrain.objectives.FreMAEConfig` (masking, bands,
            loss weights, decoder width).

    ``forward(batch)``: ``batch["image"]`` ``(B, M, *S)`` and optionally
    ``batch["foreground"]`` ``(B, *S)`` (default: all modalities nonzero) ->
    ``{"loss", "loss_high", "loss_low", "mask_ratio"}`` (scalars; ``mask_ratio`` is the
    fraction of foreground pixels, or of patches, actually masked).
    """

    def __init__(self, backbone: nn.Module, cfg: "FreMAEConfig") -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = int(backbone.spatial_dims)
        self.modalities = int(backbone.in_chans)
        self.mask_ratio = cfg.mask_ratio
        self.mask_mode = cfg.mask_mode
        self.mask_scope = cfg.mask_scope
        self.jitter = cfg.jitter
        self.jitter_shape = cfg.jitter_shape
        self.radius = float(cfg.radius)
        self.filter_kind = cfg.filter_kind
        self.low_pool = cfg.low_pool
        self.high_weight = cfg.high_weight
        self.low_weight = cfg.low_weight
        self.loss_kind = cfg.loss
        self.focal_alpha = cfg.focal_alpha
        self.target_norm = cfg.target_norm

        size = backbone_image_size(backbone)
        if size % self.low_pool:
            raise ConfigError(f"FreMAE: img_size {size} is not divisible by low_pool {self.low_pool}")
        if self.mask_mode == "pixel":
            # One learnable value per modality written into masked pixels, starting at
            # mask_token_init: 0 is the z-scored mean, FreMIM starts from 1.
            self.mask_token = nn.Parameter(torch.full((self.modalities,), float(cfg.mask_token_init)))
        else:
            vit = require_vit(backbone, "fremae (mask_mode='patch')")
            self.patch_size = int(vit.patch_embed.patch_size[0])
            self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
            # One learnable token per captured stage, filled in at masked patches.
            self.stage_mask_tokens = nn.Parameter(torch.zeros(len(backbone.feature_channels), 1, 1, vit.embed_dim))
            nn.init.normal_(self.stage_mask_tokens, std=0.02)
        self.decoder = build_fremae_decoder(cfg, backbone, (size,) * self.spatial_dims)

    # ------------------------------------------------------------------ steps

    def mask_input(self, batch: dict) -> MaskedInput:
        """Mask the batch's images: per foreground pixel (``mask_mode="pixel"``) or per
        patch (``"patch"``: the input stays intact, the encoder drops masked tokens)."""
        images = self._images(batch)
        foreground = batch.get("foreground")
        foreground = foreground_of(images) if foreground is None else foreground.bool()
        if self.mask_mode == "pixel":
            masked, mask = pixel_masking(
                images, foreground, self.mask_ratio, self.mask_token,
                scope=self.mask_scope, jitter=self.jitter, jitter_shape=self.jitter_shape,
            )
            ratio = mask.sum() / foreground.sum().clamp_min(1)
            return MaskedInput(masked, mask, ratio)
        patch_mask = random_masking(images.shape[0], self.grid[0] * self.grid[1], self.mask_ratio, images.device)
        grid_mask = patch_mask.mask.view(images.shape[0], *self.grid) > 0  # (B, Hp, Wp)
        pixel_mask = upsample_mask(grid_mask, self.patch_size)  # (B, H, W)
        masked = images * (~pixel_mask).unsqueeze(1)  # what the encoder sees, for the figure
        return MaskedInput(masked, pixel_mask, patch_mask.mask.mean(), patch_mask)

    def forward_encoder(self, masked: Tensor, patch_mask: PatchMask | None = None) -> list[Tensor]:
        """Stage maps ``[(B, C_i, *S/stride_i), ...]`` of the masked input."""
        if patch_mask is None:
            return self.backbone.forward_stages(masked)
        self.backbone.check_input(masked)
        vit = self.backbone.model
        _, captured = vit_forward_visible(vit, masked, patch_mask.ids_keep, self.backbone.out_indices)
        stages = []
        for tokens, mask_token in zip(captured, self.stage_mask_tokens):
            visible = tokens[:, vit.num_prefix_tokens :]  # (B, K, C)
            full = fill_mask_tokens(visible, mask_token, patch_mask.ids_restore)  # (B, L, C)
            stages.append(full.transpose(1, 2).reshape(full.shape[0], -1, *self.grid))  # (B, C, Hp, Wp)
        return stages

    def forward_decoder(
        self, stages: list[Tensor], image_size: tuple[int, ...], masked: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """High-band prediction ``(B, M, *S)`` and low-band prediction ``(B, M, *S/low_pool)``
        (the decoder's full-resolution path, if it has one, reads the ``masked`` input
        ``(B, M, *S)``)."""
        return self.decoder(stages, image_size, masked)

    def transferable_decoder(self) -> nn.Module | None:
        """The decoder blocks a segmenter takes over: ``unetr``: SwinUNETR's UNETR trunk
        (MONAI names; segmentation decoder ``unetr``); ``light``: the multi-stage trunk
        (pyramid, input path, top-down path; segmentation decoder ``multistage``)."""
        transferable = getattr(self.decoder, "transferable", None)
        return transferable() if callable(transferable) else None

    def target_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The images whose bands the predictions are compared with: ``images``
        ``(B, M, *S)`` for the high band and the pooled images ``(B, M, *S/low_pool)`` for
        the low band; with ``target_norm`` each shifted and scaled per (sample, modality)
        so that its band has mean 0 and variance 1."""
        pooled = average_pool(images, self.low_pool, self.spatial_dims)
        if not self.target_norm:
            return images, pooled
        return (
            standardised_band_target(images, self.radius, self.filter_kind, "high", self.spatial_dims),
            standardised_band_target(pooled, self.radius, self.filter_kind, "low", self.spatial_dims),
        )

    def band_targets(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """High band of the target image ``(B, M, *S, 2)`` and low band of the pooled
        target ``(B, M, *S/low_pool, 2)`` (see :meth:`target_images`)."""
        target_high, target_low = self.target_images(images)
        return self.high_spectrum(target_high), self.low_spectrum(target_low)

    def high_spectrum(self, x: Tensor) -> Tensor:
        mask = band_mask(x.shape[2:], self.radius, self.filter_kind, "high", x.device)
        return apply_band(spectrum(x, self.spatial_dims), mask)

    def low_spectrum(self, x: Tensor) -> Tensor:
        mask = band_mask(x.shape[2:], self.radius, self.filter_kind, "low", x.device)
        return apply_band(spectrum(x, self.spatial_dims), mask)

    def forward_loss(self, images: Tensor, pred_high: Tensor, pred_low: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Total, high-band and low-band losses for the unmasked ``images`` ``(B, M, *S)``."""
        target_high, target_low = self.target_images(images)
        if self.loss_kind == "pixel":
            loss_high = F.mse_loss(pred_high.float(), target_high.float())
            loss_low = F.mse_loss(pred_low.float(), target_low.float())
        else:
            # focal_frequency_loss of the band-filtered spectra (high_spectrum, low_spectrum),
            # from one real FFT of each band's difference
            loss_high = band_focal_loss(pred_high, target_high, self.radius, self.filter_kind, "high",
                                        self.focal_alpha, self.spatial_dims)
            loss_low = band_focal_loss(pred_low, target_low, self.radius, self.filter_kind, "low",
                                       self.focal_alpha, self.spatial_dims)
        return self.high_weight * loss_high + self.low_weight * loss_low, loss_high, loss_low

    def zero_prediction_losses(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """High- and low-band losses of a model that predicts zeros, the baseline a
        prediction must beat to have learned a band (a loss near it: nothing learned)."""
        zeros_high = torch.zeros_like(images)
        zeros_low = average_pool(zeros_high, self.low_pool, self.spatial_dims)
        _, zero_high, zero_low = self.forward_loss(images, zeros_high, zeros_low)
        return zero_high, zero_low

    # ------------------------------------------------------------------ API

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images, masked, stages = self._encode(batch)
        return self._logs(images, masked, self.forward_decoder(stages, tuple(images.shape[2:]), masked.image))

    @torch.no_grad()
    def heldout_logs(self, batch: dict) -> dict[str, Tensor]:
        """:meth:`forward`'s logs, plus each band's loss when the same decoder, on the same
        masked input, gets the encoder's stage maps zeroed (``loss_high_no_encoder``,
        ``loss_low_no_encoder``). The decoder's input path reads the masked input at full
        resolution and can predict a band around the encoder: a band whose loss does not
        rise without the encoder trains the decoder, not the encoder (docs/fidelity.md)."""
        images, masked, stages = self._encode(batch)
        size = tuple(images.shape[2:])
        logs = self._logs(images, masked, self.forward_decoder(stages, size, masked.image))
        blind = self.forward_decoder([torch.zeros_like(stage) for stage in stages], size, masked.image)
        _, logs["loss_high_no_encoder"], logs["loss_low_no_encoder"] = self.forward_loss(images, *blind)
        return logs

    def _encode(self, batch: dict) -> tuple[Tensor, MaskedInput, list[Tensor]]:
        """The batch's images, their masking and the encoder's stage maps."""
        images = self._images(batch)
        masked = self.mask_input(batch)
        stages = self.forward_encoder(masked.image if masked.patch_mask is None else images, masked.patch_mask)
        return images, masked, stages

    def _logs(self, images: Tensor, masked: MaskedInput, predictions: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        loss, loss_high, loss_low = self.forward_loss(images, *predictions)
        return {
            "loss": loss,
            "loss_high": loss_high.detach(),
            "loss_low": loss_low.detach(),
            "mask_ratio": masked.ratio.detach().float(),
        }

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> dict[str, Tensor]:
        """Everything the reconstruction figure shows, for the samples of ``batch``.

        Returns (``S`` = input size, ``s = S / low_pool``):
            ``image`` ``(B, M, *S)``, ``masked`` ``(B, M, *S)``, ``mask`` ``(B, *S)``,
            ``target_high``/``pred_high`` ``(B, M, *S)``: high-band images (inverse
            spectra of the band-filtered target and prediction),
            ``target_low``/``pred_low`` ``(B, M, *s)``: low-band images,
            ``target_high_spectrum``/``pred_high_spectrum`` ``(B, M, *S)`` and
            ``target_low_spectrum``/``pred_low_spectrum`` ``(B, M, *s)``: log(1 + |F|)
            of the band-filtered spectra.
        """
        images = self._images(batch)
        masked = self.mask_input(batch)
        encoder_input = masked.image if masked.patch_mask is None else images
        stages = self.forward_encoder(encoder_input, masked.patch_mask)
        pred_high, pred_low = self.forward_decoder(stages, tuple(images.shape[2:]), masked.image)
        target_high, target_low = self.band_targets(images)
        spectra = {
            "high": (target_high, self.high_spectrum(pred_high)),
            "low": (target_low, self.low_spectrum(pred_low)),
        }
        out = {"image": images, "masked": masked.image, "mask": masked.mask}
        for band, (target, pred) in spectra.items():
            out[f"target_{band}"] = inverse_spectrum(target, self.spatial_dims)
            out[f"pred_{band}"] = inverse_spectrum(pred, self.spatial_dims)
            out[f"target_{band}_spectrum"] = torch.log1p(target.norm(dim=-1))
            out[f"pred_{band}_spectrum"] = torch.log1p(pred.norm(dim=-1))
        return out

    def _images(self, batch: dict) -> Tensor:
        images = batch.get("image") if isinstance(batch, dict) else None
        if images is None or images.ndim != 2 + self.spatial_dims:
            shape = None if images is None else tuple(images.shape)
            raise DataError(
                f"FreMAE batch['image'] must be (B, M, *S) with {self.spatial_dims} spatial dims, got {shape}"
            )
        return images


def build_fremae_decoder(cfg: "FreMAEConfig", backbone: nn.Module, image_size: tuple[int, ...]) -> nn.Module:
    """``cfg.decoder``: ``"light"`` (:class:`MultiStageDecoder`, any backbone) or ``"unetr"``
    (:class:`~medtune.pretrain.unetr_decoder.UnetrFrequencyDecoder`, swinunetr backbones)."""
    spatial_dims = int(backbone.spatial_dims)
    if cfg.decoder == "unetr":
        from medtune.pretrain.unetr_decoder import UnetrFrequencyDecoder

        if cfg.mask_mode != "pixel":
            raise ConfigError("objective.decoder 'unetr' reads the masked image: it needs mask_mode 'pixel'")
        if not cfg.image_path:
            raise ConfigError("objective.decoder 'unetr' always reads the masked image (encoder1): "
                              "image_path false applies to decoder 'light' only")
        if cfg.full_resolution_width is not None:
            raise ConfigError("objective.full_resolution_width applies to decoder 'light' only "
                              "(unetr's full-resolution maps have the backbone's feature_size)")
        return UnetrFrequencyDecoder(
            backbone.feature_channels,
            backbone.feature_strides,
            image_channels=int(backbone.in_chans),
            image_size=image_size,
            spatial_dims=spatial_dims,
            low_channels=cfg.decoder_width,
            low_pool=cfg.low_pool,
            filter_per_channel=cfg.filter_per_channel,
        )
    return MultiStageDecoder(
        backbone.feature_channels,
        backbone.feature_strides,
        out_channels=int(backbone.in_chans),
        image_size=image_size,
        spatial_dims=spatial_dims,
        width=cfg.decoder_width,
        low_pool=cfg.low_pool,
        filter_per_channel=cfg.filter_per_channel,
        image_channels=int(backbone.in_chans) if cfg.image_path else None,
        image_to_low=cfg.image_path_low,
        full_resolution_width=cfg.full_resolution_width,
    )


__all__ = ["FreMAE", "MaskedInput", "average_pool", "backbone_image_size", "build_fremae_decoder"]
