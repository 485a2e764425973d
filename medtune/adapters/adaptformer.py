"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck MLP parallel to each block's MLP.

    mlp_out = MLP(u) + scale * up(ReLU(down(u)))     # u: the MLP's (normalised) input

The adapter reads the MLP's input, i.e. the LayerNorm'ed tokens (the official code's
``adapter_layernorm_option="in"`` reading); ``up`` starts at zero, so the adapted model
starts as the frozen one. Works on timm ViT and Swin (token-wise, no layout needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterMethod
from medtune.adapters.targets import AdapterTarget


@dataclass
class AdaptFormerConfig(AdapterConfig):
    """AdaptFormer: parallel bottleneck adapter on every block's MLP branch."""

    method: str = "adaptformer"
    # hidden width of the bottleneck
    bottleneck: int = 64
    # the adapter's output is multiplied by this before joining the MLP output
    scale: float = 0.1
    # dropout after the bottleneck's ReLU
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")


class ParallelAdapter(nn.Module):
    """``scale * up(dropout(ReLU(down(u))))`` with a zero-initialised ``up``."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (..., C) -> (..., C)."""
        return self.scale * self.up(self.dropout(torch.relu(self.down(u))))


def _add_parallel(adapter: nn.Module, mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + adapter(args[0])


@ADAPTERS.register("adaptformer")
class AdaptFormer(AdapterMethod):
    config_class = AdaptFormerConfig
    own_patterns = ("*.adaptformer.*",)
    needs_blocks = True

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: AdaptFormerConfig, ctx: SliceContext) -> None:
        for block in target.blocks:
            adapter = ParallelAdapter(block.dim, cfg.bottleneck, cfg.scale, cfg.dropout)
            block.module.adaptformer = adapter
            block.module.mlp.register_forward_hook(partial(_add_parallel, adapter))
