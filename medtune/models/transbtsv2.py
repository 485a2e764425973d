"""TransBTSV2 (Li et al., "TransBTSV2: Wider Instead of Deeper Transformer for Medical
Image Segmentation", 2022): a 3D CNN encoder, a Transformer bottleneck, Deformable
Bottleneck Modules and a progressive upsampling decoder, trained from scratch.

No official code of V2 exists (TransBTS V1's is public: Rubics-Xuan/TransBTS). What the
paper states and medtune follows: a CNN encoder with output stride 8 whose features
become tokens of a Transformer bottleneck that is made wider rather than deeper, a
Deformable Bottleneck Module (DBM) with deformable 3D convolution for shape-aware local
detail, a progressive upsampling decoder with skip connections, training from scratch.

**medtune's choices** (every one an option of :class:`TransBTSV2Options`):

- Encoder: V1's (stem conv to ``base_channels``, pre-activation residual blocks
  ``encoder_blocks = (1, 2, 2, 4)`` at widths ``base * (1, 2, 4, 8)``, stride-2 3x3x3
  convs between levels), with GroupNorm instead of V1's BatchNorm (3D batches are small).
- Tokens: a 3x3x3 conv from ``8 * base`` to ``embed_dim`` at stride 8, one token per
  voxel, plus a learned position embedding for the training crop's token grid,
  resampled trilinearly when another grid comes in.
- "Wider, not deeper": ``depth = 1`` Transformer block (V1: 4) whose attention runs at
  ``attn_expansion * embed_dim`` channels (q, k, v projected up, the heads' output
  projected back down: an inverted bottleneck around attention) and whose MLP is
  ``mlp_ratio * embed_dim`` wide (8 x 512 = V1's 4096). Pre-norm, as V1.
- Back to a volume: LayerNorm, then a 3x3x3 conv to ``8 * base`` and a residual block
  (V1's "feature mapping").
- DBM: ``x + expand(deform(reduce(x)))`` with 1x1x1 reduce by ``dbm_reduction``, a
  3x3x3 deformable conv (:class:`medtune.models.deform_conv.DeformConv`, offsets
  zero-initialised) and a 1x1x1 expand, each normalised and activated; one on each skip
  connection of ``dbm_levels`` (levels 1, 2 = strides 2 and 4; the full-resolution skip
  is left plain for memory).
- Decoder: per level, 1x1x1 conv to the skip's width, transposed conv x2, concatenation
  with the (DBM-refined) skip, 1x1x1 conv, residual block (V1's ``DeUp_Cat`` +
  ``DeBlock``); a 1x1x1 classifier. The last decoder map is the pixel embedding.

Shapes: ``x (B, M, H, W, D)`` with sides multiples of 8 (``forward`` pads any other
size) -> logits ``(B, K, H, W, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.errors import ConfigError
from medtune.models.blocks import ResidualBlock, UpConcat, conv_layer, norm_layer, resize
from medtune.models.deform_conv import DeformConv
from medtune.models.networks import SegmentationNetwork, network_options, round_up

OUTPUT_STRIDE = 8


@dataclass
class TransBTSV2Options:
    """Options of the ``transbtsv2`` network (defaults: medtune's BraTS recipe)."""

    base_channels: int = 16  # encoder widths base * (1, 2, 4, 8)
    encoder_blocks: tuple[int, ...] = (1, 2, 2, 4)  # residual blocks per encoder level (V1's)
    embed_dim: int = 512  # token width
    depth: int = 1  # Transformer blocks (V1: 4): wider, not deeper
    num_heads: int = 8  # attention heads
    attn_expansion: float = 2.0  # attention runs at attn_expansion * embed_dim channels
    mlp_ratio: float = 8.0  # MLP width / embed_dim (V1: 4096 / 512)
    dropout: float = 0.1  # after the position embedding, in the MLP and after attention (V1: 0.1)
    attn_dropout: float = 0.1  # on the attention weights (V1: 0.1)
    dbm_levels: tuple[int, ...] = (1, 2)  # skip levels with a Deformable Bottleneck Module (stride 2**level)
    dbm_reduction: int = 4  # DBM bottleneck: channels / dbm_reduction
    norm: str = "group"  # "group", "batch" or "instance"

    def __post_init__(self) -> None:
        if len(self.encoder_blocks) != 4 or min(self.encoder_blocks) < 1:
            raise ValueError(f"encoder_blocks needs 4 counts >= 1, got {list(self.encoder_blocks)}")
        width = int(self.embed_dim * self.attn_expansion)
        if width % self.num_heads or width < self.num_heads:
            raise ValueError(
                f"attention width embed_dim * attn_expansion = {width} is not divisible by num_heads {self.num_heads}"
            )
        if any(level not in (0, 1, 2) for level in self.dbm_levels):
            raise ValueError(f"dbm_levels are skip levels 0, 1, 2; got {list(self.dbm_levels)}")
        if self.depth < 1 or self.base_channels < 1 or self.dbm_reduction < 1:
            raise ValueError("depth, base_channels and dbm_reduction must be >= 1")


class WideAttention(nn.Module):
    """Multi-head self-attention at ``width`` channels on ``dim``-wide tokens:
    ``(B, N, dim) -> (B, N, dim)``; q, k, v are projected up to ``width``, the heads'
    output back down to ``dim``."""

    def __init__(self, dim: int, width: int, num_heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * width)
        self.proj = nn.Linear(width, dim)
        self.attn_dropout = attn_dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, N, w/h)
        drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=drop)  # (B, h, N, w/h)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(batch, tokens, -1)))


class WideTransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``; ``(B, N, dim)``."""

    def __init__(self, dim: int, opts: TransBTSV2Options) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WideAttention(dim, int(dim * opts.attn_expansion), opts.num_heads, opts.attn_dropout, opts.dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * opts.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(opts.dropout), nn.Linear(hidden, dim), nn.Dropout(opts.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeformableBottleneck(nn.Module):
    """DBM: ``relu(x + expand(relu(norm(deform(reduce(x))))))``, ``reduce`` a 1x1x1 conv to
    ``channels / reduction`` (+ norm, ReLU), ``deform`` a 3x3x3 deformable conv, ``expand`` a
    1x1x1 conv back (+ norm); ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, spatial_dims: int, channels: int, reduction: int, norm: str) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        hidden = max(channels // reduction, 1)
        self.reduce = nn.Sequential(conv(channels, hidden, 1, bias=False), norm_layer(spatial_dims, norm, hidden),
                                    nn.ReLU(inplace=True))
        self.deform = DeformConv(spatial_dims, hidden, hidden, 3, bias=False)
        self.deform_norm = norm_layer(spatial_dims, norm, hidden)
        self.expand = nn.Sequential(conv(hidden, channels, 1, bias=False), norm_layer(spatial_dims, norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.deform_norm(self.deform(self.reduce(x))))
        return F.relu(x + self.expand(y))


def _encoder_level(spatial_dims: int, in_ch: int, out_ch: int, blocks: int, norm: str, downsample: bool) -> nn.Sequential:
    conv = conv_layer(spatial_dims)
    first = conv(in_ch, out_ch, 3, stride=2 if downsample else 1, padding=1)
    return nn.Sequential(first, *(ResidualBlock(spatial_dims, out_ch, norm) for _ in range(blocks)))


class TransBTSV2(SegmentationNetwork):
    """TransBTSV2 (see the module docstring for what is the paper's and what is medtune's).

    Args:
        in_chans: modalities M.
        num_classes: K.
        token_grid: the token grid of the training crop (its padded size / 8), the size
            of the learned position embedding.
        opts: :class:`TransBTSV2Options`.
    """

    def __init__(self, in_chans: int, num_classes: int, token_grid: Sequence[int], opts: TransBTSV2Options) -> None:
        super().__init__(in_chans, num_classes, OUTPUT_STRIDE)
        dims, base, norm = 3, opts.base_channels, opts.norm
        widths = [base * 2**i for i in range(4)]
        self.encoder = nn.ModuleList(
            _encoder_level(dims, in_chans if i == 0 else widths[i - 1], widths[i], opts.encoder_blocks[i], norm, i > 0)
            for i in range(4)
        )
        self.to_tokens = nn.Sequential(norm_layer(dims, norm, widths[3]), nn.ReLU(inplace=True),
                                       conv_layer(dims)(widths[3], opts.embed_dim, 3, padding=1))
        self.position = nn.Parameter(torch.zeros(1, opts.embed_dim, *token_grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.token_dropout = nn.Dropout(opts.dropout)
        self.transformer = nn.Sequential(*(WideTransformerBlock(opts.embed_dim, opts) for _ in range(opts.depth)))
        self.token_norm = nn.LayerNorm(opts.embed_dim)
        self.from_tokens = nn.Sequential(
            conv_layer(dims)(opts.embed_dim, widths[3], 3, padding=1, bias=False),
            norm_layer(dims, norm, widths[3]), nn.ReLU(inplace=True), ResidualBlock(dims, widths[3], norm),
        )
        self.skip_refine = nn.ModuleList(
            DeformableBottleneck(dims, widths[i], opts.dbm_reduction, norm) if i in opts.dbm_levels else nn.Identity()
            for i in range(3)
        )
        self.up = nn.ModuleList(UpConcat(dims, widths[i + 1], widths[i]) for i in range(3))
        self.decode = nn.ModuleList(ResidualBlock(dims, widths[i], norm) for i in range(3))
        self.classifier = conv_layer(dims)(widths[0], num_classes, 1)
        self.embedding_channels = widths[0]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """``(1, N, E)`` position embedding of a token grid (resampled if not the training grid)."""
        return resize(self.position, grid).flatten(2).transpose(1, 2)

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = []
        for i, level in enumerate(self.encoder):
            x = level(x)  # (B, base * 2**i, *S / 2**i)
            if i < 3:
                skips.append(x)
        volume = self.to_tokens(x)  # (B, E, *S/8)
        grid = volume.shape[2:]
        tokens = volume.flatten(2).transpose(1, 2) + self.position_embedding(grid)  # (B, N, E)
        tokens = self.token_norm(self.transformer(self.token_dropout(tokens)))
        x = self.from_tokens(tokens.transpose(1, 2).reshape(volume.shape))  # (B, 8 base, *S/8)
        for i in (2, 1, 0):
            x = self.decode[i](self.up[i](x, self.skip_refine[i](skips[i])))  # (B, base * 2**i, *S / 2**i)
        return {"logits": self.classifier(x), "embedding": x}


def build_transbtsv2(in_chans: int, num_classes: int, img_size: Sequence[int], options: Mapping) -> TransBTSV2:
    """``transbtsv2`` in :data:`medtune.models.networks.NETWORKS`; ``img_size`` (the training
    crop) sets the learned position embedding's grid."""
    opts = network_options(TransBTSV2Options, options)
    if any(s < 1 for s in img_size):
        raise ConfigError(f"transbtsv2: crop size {list(img_size)} must be positive")
    grid = tuple(s // OUTPUT_STRIDE for s in round_up(img_size, OUTPUT_STRIDE))
    return TransBTSV2(in_chans, num_classes, grid, opts)


__all__ = ["DeformableBottleneck", "TransBTSV2", "TransBTSV2Options", "WideAttention", "build_transbtsv2"]
