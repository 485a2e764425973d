"""AGLN decoder (Li et al., "Attention Guided Global Enhancement and Local Refinement
Network for Semantic Segmentation", IEEE TIP 2022), read from its official code
(zhasen1996/AGLN, ``encoding/models/sseg/agln.py``), for any hierarchical backbone and
any ``spatial_dims`` (every operation is a 1x1 conv or acts on flattened positions, so
the 2D math carries over to 3D unchanged).

The decoder is an FPN whose top-down steps are Context Fusion Blocks (CFBs):

- Semantic Aggregation Block (:class:`SemanticAggregation`): from a decoder map
  ``x (B, C, *S)``, ``N`` global descriptors ``(B, C, N)`` = features (1x1 conv) times a
  softmax attention over positions (1x1 conv to ``N`` maps).
- Semantic Distribution Module (:class:`SemanticDistribution`): each pixel of a
  decoder map takes a softmax mixture (over the ``N`` descriptors, weights from a 1x1
  conv of the pixel) of the descriptors, then a 1x1 conv: ``G (B, C, *S)``.
- Local Refinement Module (:func:`local_refinement`): the decoder map re-weights the
  encoder map's channels (channel affinity ``x_de x_en^T``, turned into
  ``softmax(max - affinity)`` as the official code does against divergence), then a
  spatial gate ``sigmoid(G)``.
- CFB: ``out = ConvNormAct(x_de + alpha * G + beta * (gamma * LRM + x_en))`` with
  learnable ``alpha = 0``, ``beta = 1``, ``gamma = 0`` at init: a fresh CFB is an FPN
  merge ``ConvNormAct(x_de + x_en)``.

Topology (official): the deepest feature goes through a 3x3 ConvNormAct; then for each
shallower level ``i`` (laterals: 1x1 ConvNormAct), the descriptors of the decoder map
entering the level are aggregated, and the level's decoder map (the upsampled deeper
one) passes one CFB per descriptor set aggregated so far, deepest first. Every level's
map (3x3 ConvNormAct) is upsampled to the shallowest level's size, concatenated, fused
by a 3x3 ConvNormAct (the embedding), dropped out and classified.
Defaults follow the official head (``N = channels / 4``, dropout 0.1, resizing with
``align_corners=True`` as PyTorch-Encoding does) at medtune's decoder width
(``channels = 128``, ``fuse_channels = channels``; official 256 and 512).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medtune.errors import ConfigError
from medtune.models.blocks import ConvNormAct, conv_layer, resize


class SemanticAggregation(nn.Module):
    """SAB: ``x (B, C_in, *S)`` -> descriptors ``(B, C, N)``: features weighted by a softmax
    over positions, one attention map per descriptor."""

    def __init__(self, spatial_dims: int, in_ch: int, channels: int, descriptors: int) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.features = conv(in_ch, channels, 1)
        self.attention = conv(in_ch, descriptors, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).flatten(2)  # (B, C, P)
        attention = self.attention(x).flatten(2).softmax(-1)  # (B, N, P), each map sums to 1 over positions
        return features @ attention.transpose(1, 2)  # (B, C, N)


class SemanticDistribution(nn.Module):
    """SDM: descriptors ``(B, C, N)`` and a decoder map ``(B, C, *S)`` -> ``G (B, C, *S)``."""

    def __init__(self, spatial_dims: int, channels: int, descriptors: int) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.weights = conv(channels, descriptors, 1)
        self.out = conv(channels, channels, 1)

    def forward(self, descriptors: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        mixture = self.weights(decoder).softmax(1).flatten(2)  # (B, N, P): softmax over descriptors
        distributed = (descriptors @ mixture).reshape(decoder.shape)  # (B, C, *S)
        return self.out(distributed)


def local_refinement(encoder: torch.Tensor, decoder: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """LRM: channel re-weighting of ``encoder (B, C, *S)`` guided by ``decoder (B, C, *S)``,
    then the spatial gate ``sigmoid(gate)``; ``(B, C, *S)``."""
    flat_en = encoder.flatten(2)  # (B, C, P)
    affinity = decoder.flatten(2) @ flat_en.transpose(1, 2)  # (B, C_de, C_en)
    affinity = affinity.amax(-1, keepdim=True) - affinity  # the official code's stabilised energy
    resampled = (affinity.softmax(-1) @ flat_en).reshape(encoder.shape)
    return resampled * torch.sigmoid(gate)


class ContextFusionBlock(nn.Module):
    """CFB: ``ConvNormAct(x_de + alpha * G + beta * (gamma * LRM(x_en, x_de, G) + x_en))``,
    ``G = SDM(descriptors, x_de)``; alpha, beta, gamma learnable, 0 / 1 / 0 at init."""

    def __init__(self, spatial_dims: int, channels: int, descriptors: int, norm: str) -> None:
        super().__init__()
        self.distribute = SemanticDistribution(spatial_dims, channels, descriptors)
        self.fuse = ConvNormAct(spatial_dims, channels, channels, 3, norm)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.ones(1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, encoder: torch.Tensor, decoder: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        global_context = self.distribute(descriptors, decoder)
        local = self.gamma * local_refinement(encoder, decoder, global_context) + encoder
        return self.fuse(decoder + self.alpha * global_context + self.beta * local)


class AGLNDecoder(nn.Module):
    """AGLN over N hierarchical features (strides increasing); logits at the input size.

    Args:
        in_channels, in_strides: per feature, shallow -> deep (as ``forward_stages``).
        num_classes: K.
        spatial_dims: 2 or 3.
        channels: decoder width (official 256).
        descriptors: global descriptors N per aggregation (default ``channels // 4``).
        fuse_channels: width of the fused map before the classifier (default ``channels``;
            official 512).
        dropout: before the classifier.
        norm: "batch", "instance" or "group".
        align_corners: of every linear resize (official True).
    """

    head_modules = ("classifier",)  # what forward_head adds to forward_decoder

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int,
                 spatial_dims: int = 2, channels: int = 128, descriptors: int | None = None,
                 fuse_channels: int | None = None, dropout: float = 0.1, norm: str = "batch",
                 align_corners: bool = True) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides) or len(in_channels) < 2:
            raise ConfigError("the agln decoder needs two or more features, one stride each")
        if len(set(in_strides)) == 1 or any(b < a for a, b in zip(in_strides, in_strides[1:])):
            raise ConfigError(
                f"the agln decoder needs a hierarchical backbone (strides increasing), got strides {tuple(in_strides)}"
            )
        n = len(in_channels)
        count = descriptors or max(channels // 4, 1)
        self.deepest = ConvNormAct(spatial_dims, in_channels[-1], channels, 3, norm)
        self.lateral = nn.ModuleList(ConvNormAct(spatial_dims, c, channels, 1, norm) for c in in_channels[:-1])
        # aggregate[j]: descriptors of the decoder map entering level j (levels n-2 .. 0)
        self.aggregate = nn.ModuleList(SemanticAggregation(spatial_dims, channels, channels, count) for _ in range(n - 1))
        # fusion[i][k]: the k-th CFB of level i, using the descriptors of level n-2-k (deepest first)
        self.fusion = nn.ModuleList(
            nn.ModuleList(ContextFusionBlock(spatial_dims, channels, count, norm) for _ in range(n - 1 - i))
            for i in range(n - 1)
        )
        self.level_out = nn.ModuleList(ConvNormAct(spatial_dims, channels, channels, 3, norm) for _ in range(n - 1))
        fused = fuse_channels or channels
        self.fuse = ConvNormAct(spatial_dims, n * channels, fused, 3, norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = conv_layer(spatial_dims)(fused, num_classes, 1)
        self.embedding_channels = fused
        self.align_corners = align_corners

    def forward_decoder(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features [(B, C_i, *S_i)]`` -> the fused map ``(B, channels, *S_0)``."""
        corners = self.align_corners
        x = self.deepest(features[-1])
        size = features[0].shape[2:]
        outs = [resize(x, size, corners)]
        descriptors: list[torch.Tensor] = []
        for i in range(len(features) - 2, -1, -1):  # deep -> shallow
            encoder = self.lateral[i](features[i])
            descriptors.append(self.aggregate[i](x))  # (B, C, N) of the map entering level i
            x = resize(x, encoder.shape[2:], corners)
            for block, global_descriptors in zip(self.fusion[i], descriptors):
                x = block(encoder, x, global_descriptors)
            outs.append(resize(self.level_out[i](x), size, corners))
        return self.fuse(torch.cat(outs, dim=1))

    def forward_head(self, fused: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """The fused map -> logits ``(B, K, *out_size)``."""
        return resize(self.classifier(self.dropout(fused)), out_size, self.align_corners)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """``features [(B, C_i, *S_i)]`` -> logits ``(B, K, *out_size)``."""
        return self.forward_head(self.forward_decoder(features), out_size)


def build_agln(in_channels, in_strides, num_classes, spatial_dims=2, **options) -> AGLNDecoder:
    """``agln`` in :data:`medtune.models.decoders.DECODERS`."""
    return AGLNDecoder(in_channels, in_strides, num_classes, spatial_dims, **options)


__all__ = ["AGLNDecoder", "ContextFusionBlock", "SemanticAggregation", "SemanticDistribution", "build_agln",
           "local_refinement"]
