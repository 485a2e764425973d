"""MAE baseline (He et al., CVPR 2022) on a timm VisionTransformer backbone.

Steps, as in the paper: ``patchify`` the image, ``random_masking`` of 75% of the patches
(argsort of noise), ``forward_encoder`` on the visible tokens only (through the timm ViT's
own ``patch_embed``, ``_pos_embed``, ``blocks`` and ``norm``), ``forward_decoder`` (a light
transformer that sees visible tokens plus mask tokens), ``forward_loss`` (MSE on the
masked patches, against per-patch normalised pixels).

The helpers :func:`vit_embed_patches` and :func:`vit_forward_visible` are shared with
FreMAE's MAE-style ``mask_mode="patch"``.

Deviation from the official MAE: the decoder's position embedding is learned (truncated
normal init) instead of fixed 2D sin-cos, so any patch grid works without a table.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from medtune.errors import ConfigError
from medtune.pretrain.masking import PatchMask, gather_patches, random_masking


def require_vit(backbone: nn.Module, objective: str) -> nn.Module:
    """The timm VisionTransformer inside ``backbone``, or a :class:`ConfigError`."""
    if getattr(backbone, "family", None) != "vit":
        raise ConfigError(
            f"objective '{objective}' needs a ViT backbone (vit_*/deit*), got family "
            f"'{getattr(backbone, 'family', type(backbone).__name__)}'"
        )
    model = backbone.model
    if getattr(model, "dynamic_img_size", False):
        raise ConfigError(f"objective '{objective}': dynamic_img_size ViTs are not supported")
    return model


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, M, H, W) -> (B, L, p*p*M)``, patches in row-major order, pixels (p, p, M)."""
    b, m, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, m, gh, patch, gw, patch)
    x = torch.einsum("bmhpwq->bhwpqm", x)
    return x.reshape(b, gh * gw, patch * patch * m)


def unpatchify(patches: Tensor, patch: int, grid: Sequence[int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p*p*M) -> (B, M, H, W)``."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    x = torch.einsum("bhwpqm->bmhpwq", x)
    return x.reshape(b, channels, gh * patch, gw * patch)


def vit_embed_patches(vit: nn.Module, images: Tensor) -> Tensor:
    """Patch tokens with position embeddings: ``(B, M, H, W) -> (B, P + L, C)``
    (``P`` prefix tokens such as the class token first), before the blocks."""
    x = vit.patch_embed(images)  # (B, L, C)
    x = vit._pos_embed(x)  # (B, P + L, C)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def vit_forward_visible(
    vit: nn.Module, images: Tensor, ids_keep: Tensor, capture: Sequence[int] = ()
) -> tuple[Tensor, list[Tensor]]:
    """Run the ViT on the visible patches only.

    Args:
        images: ``(B, M, H, W)``.
        ids_keep: ``(B, K)`` indices of the visible patches.
        capture: block indices whose outputs are returned as well.

    Returns:
        the normed final tokens ``(B, P + K, C)`` and the captured block outputs
        ``[(B, P + K, C), ...]`` (not normed, as timm's intermediates).
    """
    prefix = vit.num_prefix_tokens
    tokens = vit_embed_patches(vit, images)  # (B, P + L, C)
    visible = gather_patches(tokens[:, prefix:], ids_keep)  # (B, K, C)
    x = torch.cat([tokens[:, :prefix], visible], dim=1)  # (B, P + K, C)
    captured = []
    wanted = set(capture)
    for index, block in enumerate(vit.blocks):
        x = block(x)
        if index in wanted:
            captured.append(x)
    return vit.norm(x), captured


def fill_mask_tokens(visible: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Put mask tokens at the masked positions and unshuffle.

    ``visible (B, K, C)``, ``mask_token (1, 1, C)``, ``ids_restore (B, L)`` -> ``(B, L, C)``.
    """
    b, k, c = visible.shape
    fill = mask_token.expand(b, ids_restore.shape[1] - k, c)
    return gather_patches(torch.cat([visible, fill], dim=1), ids_restore)


class MAE(nn.Module):
    """Masked autoencoder around a ViT backbone.

    Args:
        backbone: a :class:`medtune.models.Backbone` of family ``"vit"``.
        mask_ratio: fraction of patches masked (0.75).
        decoder_dim, decoder_depth, decoder_heads: the light transformer decoder.
        norm_pix_loss: normalise each target patch by its own mean and variance.

    ``forward(batch)`` with ``batch["image"]`` ``(B, M, H, W)`` returns
    ``{"loss", "mask_ratio"}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        vit = require_vit(backbone, "mae")
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.in_chans = backbone.in_chans
        num_patches = self.grid[0] * self.grid[1]

        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    @property
    def vit(self) -> nn.Module:
        return self.backbone.model

    def forward_encoder(self, images: Tensor) -> tuple[Tensor, PatchMask]:
        """``(B, M, H, W)`` -> visible tokens ``(B, P + K, C)`` and the mask."""
        patch_mask = random_masking(images.shape[0], self.grid[0] * self.grid[1], self.mask_ratio, images.device)
        latent, _ = vit_forward_visible(self.vit, images, patch_mask.ids_keep)
        return latent, patch_mask

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Visible tokens ``(B, P + K, C)`` -> pixel predictions ``(B, L, p*p*M)``."""
        x = self.decoder_embed(latent[:, self.vit.num_prefix_tokens :])  # (B, K, Cd)
        x = fill_mask_tokens(x, self.mask_token, ids_restore)  # (B, L, Cd)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, L, p*p*M)

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error on masked patches: ``images (B, M, H, W)``,
        ``pred (B, L, p*p*M)``, ``mask (B, L)`` (1 = masked)."""
        target = patchify(images, self.patch_size)  # (B, L, p*p*M)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        latent, patch_mask = self.forward_encoder(images)
        pred = self.forward_decoder(latent, patch_mask.ids_restore)
        loss = self.forward_loss(images, pred, patch_mask.mask)
        return {"loss": loss, "mask_ratio": patch_mask.mask.mean().detach()}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> dict[str, Tensor]:
        """Input, masked input (masked patches zeroed) and the reconstruction, each
        ``(B, M, H, W)``; with ``norm_pix_loss`` the prediction is de-normalised with the
        target patches' own statistics on masked patches (as MAE's visualisation does)."""
        images = batch["image"]
        latent, patch_mask = self.forward_encoder(images)
        pred = self.forward_decoder(latent, patch_mask.ids_restore)  # (B, L, p*p*M)
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        keep = patch_mask.mask.unsqueeze(-1)  # (B, L, 1)
        pasted = unpatchify(target * (1 - keep) + pred * keep, self.patch_size, self.grid, self.in_chans)
        masked = unpatchify(target * (1 - keep), self.patch_size, self.grid, self.in_chans)
        pixel_mask = unpatchify(keep.expand_as(target), self.patch_size, self.grid, self.in_chans)[:, 0] > 0
        return {"image": images, "masked": masked, "mask": pixel_mask, "prediction": pasted}


__all__ = [
    "MAE",
    "patchify",
    "unpatchify",
    "vit_embed_patches",
    "vit_forward_visible",
    "fill_mask_tokens",
    "require_vit",
]
