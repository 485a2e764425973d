"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck MLP parallel to each block's MLP.

As the official code (``ffn_option="parallel"``, ``adapter_layernorm_option="none"``)::

    x = x + attn(norm1(x))                              # x: the block's residual stream
    x = x + mlp(norm2(x)) + scale * up(dropout(ReLU(down(x))))

The adapter reads the residual stream ``x`` itself, not the frozen ``norm2(x)``;
``layer_norm="in"`` puts a new, trainable LayerNorm before ``down`` (the official "in"
option), ``"out"`` after ``up``. Initialisation as the official ``"lora"`` option:
``down`` weight PyTorch's default (Kaiming uniform), ``down`` bias, ``up`` weight and
bias zero, so the adapted model starts as the frozen one. Dropout 0.1 as the official
image recipe. Works on timm ViT and Swin (token-wise, no layout needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterMethod
from medtune.adapters.targets import AdapterTarget, add_beside_mlp

LAYER_NORM_OPTIONS = ("none", "in", "out")


@dataclass
class AdaptFormerConfig(AdapterConfig):
    """AdaptFormer: parallel bottleneck adapter beside every block's MLP branch."""

    method: str = "adaptformer"
    # hidden width of the bottleneck
    bottleneck: int = 64
    # the adapter's output is multiplied by this before joining the MLP output
    scale: float = 0.1
    # dropout after the bottleneck's ReLU (official image recipe 0.1)
    dropout: float = 0.1
    # "none": the adapter reads the residual stream as is (official recipes); "in": a new
    # trainable LayerNorm before down; "out": one after up
    layer_norm: str = "none"

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.layer_norm not in LAYER_NORM_OPTIONS:
            raise ValueError(f"layer_norm must be one of {LAYER_NORM_OPTIONS}, got '{self.layer_norm}'")


class ParallelAdapter(nn.Module):
    """``scale * up(dropout(ReLU(down(x))))`` (with an optional LayerNorm before or after);
    ``up`` and ``down``'s bias start at zero."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, layer_norm: str = "none") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layer_norm != "none" else None
        self.layer_norm = layer_norm
        self.down = nn.Linear(dim, bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C)."""
        if self.layer_norm == "in":
            x = self.norm(x)
        update = self.scale * self.up(self.dropout(torch.relu(self.down(x))))
        return self.norm(update) if self.layer_norm == "out" else update


@ADAPTERS.register("adaptformer")
class AdaptFormer(AdapterMethod):
    config_class = AdaptFormerConfig
    own_patterns = ("*.adaptformer.*",)
    needs_blocks = True

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: AdaptFormerConfig, ctx: SliceContext) -> None:
        for block in target.blocks:
            adapter = ParallelAdapter(block.dim, cfg.bottleneck, cfg.scale, cfg.dropout, cfg.layer_norm)
            block.module.adaptformer = adapter
            add_beside_mlp(block.module, adapter)
