"""The CRIS-style head's layers: fusion neck, pixel-word decoder, dynamic-kernel projector."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(min(32, out_channels // 4), out_channels),
        nn.ReLU(inplace=True),
    )


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def coordinate_maps(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """Normalised (x, y) coordinates in [-1, 1]: ``(B, 2, H, W)``."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)


def sine_positions_1d(length: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed sine/cosine position codes ``(length, dim)``."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)
    return codes.to(dtype)


def sine_positions_2d(height: int, width: int, dim: int, device, dtype) -> torch.Tensor:
    """Half the channels code y, half x: ``(height * width, dim)``."""
    codes_y = sine_positions_1d(height, dim // 2, device, dtype)  # [H, D/2]
    codes_x = sine_positions_1d(width, dim // 2, device, dtype)  # [W, D/2]
    return torch.cat(
        [codes_y[:, None, :].expand(height, width, -1), codes_x[None, :, :].expand(height, width, -1)], dim=-1
    ).reshape(height * width, dim)


class FPNFusion(nn.Module):
    """CRIS's neck: sentence-gated deepest level, top-down merge, gather at the middle level.

    Args:
        in_channels: channels of each level, shallow to deep.
        sentence_dim: E of the sentence feature.
        dim: output channels D.
    """

    def __init__(self, in_channels: list[int], sentence_dim: int, dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_gn_relu(c, dim, 1) for c in in_channels)
        self.sentence_gate = nn.Linear(sentence_dim, dim)
        self.gate_norm = nn.Sequential(nn.GroupNorm(min(32, dim // 4), dim), nn.ReLU(inplace=True))
        self.merge = nn.ModuleList(conv_gn_relu(2 * dim, dim) for _ in in_channels[:-1])
        self.gather = conv_gn_relu(len(in_channels) * dim, dim, 1)
        self.with_coords = conv_gn_relu(dim + 2, dim)

    def forward(self, levels: list[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        """levels: ``[(B, C_i, H_i, W_i)]`` shallow to deep; sentence ``(B, E)`` -> ``(B, D, h, w)``."""
        deepest = self.lateral[-1](levels[-1])
        gate = self.sentence_gate(sentence)[:, :, None, None]  # [B, D, 1, 1]
        merged = [self.gate_norm(deepest * gate)]
        for index in range(len(levels) - 2, -1, -1):  # top-down: deep -> shallow
            lateral = self.lateral[index](levels[index])
            above = resize_to(merged[0], lateral.shape[-2:])
            merged.insert(0, self.merge[index](torch.cat([lateral, above], dim=1)))
        middle = merged[len(merged) // 2].shape[-2:]
        fused = self.gather(torch.cat([resize_to(m, middle) for m in merged], dim=1))  # [B, D, h, w]
        coords = coordinate_maps(fused.shape[0], *middle, fused.device, fused.dtype)
        return self.with_coords(torch.cat([fused, coords], dim=1))


class PixelWordLayer(nn.Module):
    """Pixel self-attention, pixel-to-word cross-attention, MLP (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        pixels: torch.Tensor,
        pixel_pos: torch.Tensor,
        words: torch.Tensor,
        word_pos: torch.Tensor,
        word_padding: torch.Tensor,
    ) -> torch.Tensor:
        """pixels ``(B, N, D)``, words ``(B, L, D)``, word_padding ``(B, L)`` True = ignore."""
        normed = self.norm_self(pixels)
        query = normed + pixel_pos
        pixels = pixels + self.dropout(self.self_attn(query, query, normed, need_weights=False)[0])
        normed = self.norm_cross(pixels)
        attended = self.cross_attn(
            normed + pixel_pos, words + word_pos, words, key_padding_mask=word_padding, need_weights=False
        )[0]
        pixels = pixels + self.dropout(attended)
        return pixels + self.dropout(self.mlp(self.norm_mlp(pixels)))


class PixelWordDecoder(nn.Module):
    """A stack of :class:`PixelWordLayer` over the fused map; words projected to D first."""

    def __init__(self, dim: int, word_dim: int, layers: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.word_proj = nn.Linear(word_dim, dim)
        self.layers = nn.ModuleList(PixelWordLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, fused: torch.Tensor, words: torch.Tensor, word_padding: torch.Tensor) -> torch.Tensor:
        """fused ``(B, D, h, w)``, words ``(B, L, C_t)`` -> ``(B, D, h, w)``."""
        batch, dim, height, width = fused.shape
        pixels = fused.flatten(2).transpose(1, 2)  # [B, h*w, D]
        words = self.word_proj(words)  # [B, L, D]
        pixel_pos = sine_positions_2d(height, width, dim, fused.device, fused.dtype).unsqueeze(0)
        word_pos = sine_positions_1d(words.shape[1], dim, fused.device, fused.dtype).unsqueeze(0)
        for layer in self.layers:
            pixels = layer(pixels, pixel_pos, words, word_pos, word_padding)
        return self.norm(pixels).transpose(1, 2).reshape(batch, dim, height, width)


class DynamicKernelProjector(nn.Module):
    """Upsample the pixel map 4x; the sentence becomes a per-sample 3x3 conv kernel + bias."""

    def __init__(self, dim: int, sentence_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = dim // 2
        self.upsample = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_gn_relu(dim, dim),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_gn_relu(dim, hidden),
            nn.Conv2d(hidden, hidden, 1),
        )
        self.kernel_size = kernel_size
        self.hidden = hidden
        self.text_to_kernel = nn.Linear(sentence_dim, hidden * kernel_size * kernel_size + 1)
        # Start from a small foreground prior (sigmoid(-2) ~ 0.12), as RetinaNet does, so early
        # steps do not go into unlearning a 50% foreground guess.
        nn.init.constant_(self.text_to_kernel.bias[-1:], -2.0)

    def forward(self, pixels: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """pixels ``(B, D, h, w)``, sentence ``(B, E)`` -> logits ``(B, 1, 4h, 4w)``."""
        features = self.upsample(pixels)  # [B, D/2, 4h, 4w]
        batch, channels, height, width = features.shape
        params = self.text_to_kernel(sentence)  # [B, D/2*k*k + 1]
        weight = params[:, :-1].reshape(batch, channels, self.kernel_size, self.kernel_size)
        bias = params[:, -1]
        # One group per sample: sample b is convolved with its own kernel only.
        logits = F.conv2d(
            features.reshape(1, batch * channels, height, width), weight, bias,
            padding=self.kernel_size // 2, groups=batch,
        )
        return logits.reshape(batch, 1, height, width)
