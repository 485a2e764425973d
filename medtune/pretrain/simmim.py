"""SimMIM baseline (Xie et al., CVPR 2022) for ViT and hierarchical backbones, 2D or 3D.

Steps: ``mask_patches`` (block-wise masking on the patch-embedding grid),
``forward_encoder`` (the backbone's own forward, with a learnable mask token written
over the masked patch embeddings), ``forward_decoder`` (a 1x1 conv to
``stride^d * M`` channels and a pixel shuffle from the last stage back to full
resolution), ``forward_loss`` (L1 on the masked pixels only).

The mask token is inserted with a forward hook on the backbone's patch-embedding module
(``patch_embed`` of timm ViT/Swin and MONAI Swin, ``stem`` of ConvNeXt), so the backbone
runs unchanged and its weights are exactly the ones that are saved.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from medtune.errors import ConfigError, DataError
from medtune.models.blocks import conv_layer
from medtune.pretrain.masking import block_masking, upsample_mask


def pixel_shuffle(x: Tensor, factor: int, spatial_dims: int) -> Tensor:
    """Depth-to-space for any spatial dims: ``(B, C * r^d, *G) -> (B, C, *(G * r))``.

    Channel ``c * r^d + offset`` goes to the sub-position ``offset`` (row-major over the
    ``d`` axes) of output channel ``c``; for ``d = 2`` this is ``F.pixel_shuffle``.
    """
    b, c_in, *grid = x.shape
    c = c_in // factor**spatial_dims
    x = x.reshape(b, c, *([factor] * spatial_dims), *grid)
    # (B, C, r_1..r_d, G_1..G_d) -> (B, C, G_1, r_1, ..., G_d, r_d)
    order = [0, 1] + [i for axis in range(spatial_dims) for i in (2 + spatial_dims + axis, 2 + axis)]
    x = x.permute(order)
    return x.reshape(b, c, *[g * factor for g in grid])


class PixelShuffleHead(nn.Module):
    """SimMIM's light decoder: 1x1 conv to ``stride^d * M`` channels, then pixel shuffle.

    ``(B, C, *S/stride) -> (B, M, *S)``.
    """

    def __init__(self, channels: int, out_channels: int, stride: int, spatial_dims: int) -> None:
        super().__init__()
        self.stride = stride
        self.spatial_dims = spatial_dims
        self.proj = conv_layer(spatial_dims)(channels, stride**spatial_dims * out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle(self.proj(x), self.stride, self.spatial_dims)


@dataclass
class PatchEmbeddingSite:
    """Where a backbone embeds patches: the module, its output layout, width and stride.

    ``layout``: ``"tokens"`` ``(B, L, C)``, ``"channels_last"`` ``(B, *G, C)`` or
    ``"channels_first"`` ``(B, C, *G)``.
    """

    module: nn.Module
    layout: str
    channels: int
    stride: int


def patch_embedding_site(backbone: nn.Module) -> PatchEmbeddingSite:
    """The patch-embedding module of a :class:`medtune.models.Backbone`."""
    family = getattr(backbone, "family", None)
    model = backbone.model
    if family == "vit":
        if getattr(model, "dynamic_img_size", False):
            raise ConfigError("simmim: dynamic_img_size ViTs are not supported")
        return PatchEmbeddingSite(model.patch_embed, "tokens", int(model.embed_dim), int(model.patch_embed.patch_size[0]))
    if family == "swin":
        return PatchEmbeddingSite(model.patch_embed, "channels_last", int(model.embed_dim), backbone.feature_strides[0])
    if family == "monai_swin":
        return PatchEmbeddingSite(model.patch_embed, "channels_first", int(model.embed_dim), backbone.feature_strides[0])
    if family == "convnext":
        return PatchEmbeddingSite(model.stem, "channels_first", backbone.feature_channels[0], backbone.feature_strides[0])
    raise ConfigError(f"simmim: no known patch embedding for backbone family '{family}'")


def replace_masked_embeddings(embeddings: Tensor, mask: Tensor, mask_token: Tensor, layout: str) -> Tensor:
    """Write ``mask_token`` ``(C,)`` over the embeddings of masked patches.

    ``mask`` ``(B, *G)`` bool; ``embeddings`` in ``layout`` (see :class:`PatchEmbeddingSite`).
    """
    token = mask_token.to(embeddings.dtype)
    if layout == "tokens":
        weight = mask.flatten(1).unsqueeze(-1)  # (B, L, 1)
    elif layout == "channels_last":
        weight = mask.unsqueeze(-1)  # (B, *G, 1)
    else:
        weight = mask.unsqueeze(1)  # (B, 1, *G)
        token = token.view(1, -1, *([1] * (embeddings.ndim - 2)))
    if weight.shape[1:-1] != embeddings.shape[1:-1] and layout != "channels_first":
        raise DataError(f"simmim: mask grid {tuple(mask.shape[1:])} does not match embeddings {tuple(embeddings.shape)}")
    weight = weight.to(embeddings.dtype)
    return embeddings * (1 - weight) + token * weight


@contextmanager
def masked_patch_embedding(site: PatchEmbeddingSite, mask: Tensor, mask_token: Tensor) -> Iterator[None]:
    """While active, the backbone's patch embeddings of masked patches are ``mask_token``."""

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return replace_masked_embeddings(output, mask, mask_token, site.layout)

    handle = site.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def masked_l1(pred: Tensor, target: Tensor, pixel_mask: Tensor) -> Tensor:
    """Mean absolute error over masked pixels: ``pred/target (B, M, *S)``, ``pixel_mask (B, *S)``."""
    weight = pixel_mask.unsqueeze(1).to(pred.dtype)
    count = weight.sum() * pred.shape[1]
    return ((pred - target).abs() * weight).sum() / count.clamp_min(1.0)


class SimMIM(nn.Module):
    """SimMIM around a backbone.

    Args:
        backbone: a :class:`medtune.models.Backbone` (ViT, timm Swin, ConvNeXt, MONAI Swin).
        mask_ratio: fraction of mask blocks masked per sample (0.6).
        mask_block: side in pixels of the blocks masked together (32 in SimMIM).

    ``forward(batch)`` with ``batch["image"]`` ``(B, M, *S)`` -> ``{"loss", "mask_ratio"}``.
    """

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.6, mask_block: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.site = patch_embedding_site(backbone)
        if mask_block % self.site.stride:
            raise ConfigError(
                f"simmim: mask_block {mask_block} is not a multiple of the patch-embedding stride {self.site.stride}"
            )
        self.mask_ratio = mask_ratio
        self.block_patches = mask_block // self.site.stride
        self.spatial_dims = int(backbone.spatial_dims)
        self.mask_token = nn.Parameter(torch.zeros(self.site.channels))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = PixelShuffleHead(
            backbone.feature_channels[-1], backbone.in_chans, backbone.feature_strides[-1], self.spatial_dims
        )

    def mask_patches(self, images: Tensor) -> Tensor:
        """Block mask on the patch grid: ``(B, M, *S) -> (B, *S/stride)`` bool."""
        grid = [s // self.site.stride for s in images.shape[2:]]
        return block_masking(images.shape[0], grid, self.mask_ratio, self.block_patches, images.device)

    def forward_encoder(self, images: Tensor, mask: Tensor) -> Tensor:
        """Last stage map ``(B, C, *S/stride_last)`` with masked patches replaced."""
        with masked_patch_embedding(self.site, mask, self.mask_token):
            return self.backbone.forward_stages(images)[-1]

    def forward_decoder(self, latent: Tensor) -> Tensor:
        """``(B, C, *S/stride_last) -> (B, M, *S)``."""
        return self.decoder(latent)

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """L1 on masked pixels; ``mask`` is on the patch grid."""
        return masked_l1(pred, images, upsample_mask(mask, self.site.stride))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        mask = self.mask_patches(images)
        pred = self.forward_decoder(self.forward_encoder(images, mask))
        return {"loss": self.forward_loss(images, pred, mask), "mask_ratio": mask.float().mean().detach()}

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> dict[str, Tensor]:
        """``image``, ``masked`` (masked patches zeroed), ``mask`` ``(B, *S)`` and
        ``prediction`` ``(B, M, *S)``."""
        images = batch["image"]
        mask = self.mask_patches(images)
        pred = self.forward_decoder(self.forward_encoder(images, mask))
        pixel_mask = upsample_mask(mask, self.site.stride)
        masked = images * (~pixel_mask).unsqueeze(1)
        return {"image": images, "masked": masked, "mask": pixel_mask, "prediction": pred}


__all__ = [
    "SimMIM",
    "PixelShuffleHead",
    "pixel_shuffle",
    "patch_embedding_site",
    "masked_patch_embedding",
    "masked_l1",
]
