"""ST-Adapter (Pan et al., NeurIPS 2022) across slices: down, depthwise conv over T, up.

The adapter, on the patch tokens of a block's residual stream (B volumes of T slices)::

    x = x + up(conv_T(down(x)))      # conv_T: depthwise (k,1,1) over (T, Hp, Wp)

with ``down`` to ``C * width_ratio`` channels (ViT-B: 384) and, as the official code, the
depthwise conv zero-initialised (weight and bias), ``down`` and ``up`` biases zero and
their weights PyTorch's default, so the adapted model starts as the frozen one while
``up`` and the conv both receive gradients. Placement, as the official recipes:
``"mlp"`` before each block's MLP (``adapter12x384``, the default), ``"attn+mlp"`` before
its attention and its MLP (``adapter24x384``), or ``"attn"`` before its attention only.
Like the Med-Adapter it needs the slice count (see :mod:`medtune.adapters.context`); ViT
prefix tokens pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterMethod
from medtune.adapters.targets import (
    AdapterTarget,
    adapt_before_mlp,
    adapt_block_input,
    grid_to_volume,
    join_patches,
    split_patches,
    volume_to_grid,
)

PLACEMENTS = {"mlp": ("mlp",), "attn": ("attn",), "attn+mlp": ("attn", "mlp")}


@dataclass
class STAdapterConfig(AdapterConfig):
    """ST-Adapter: a slice-mixing bottleneck before every block's MLP (and/or attention)."""

    method: str = "st-adapter"
    # bottleneck width as a fraction of the block's channels C (official 384 of 768)
    width_ratio: float = 0.5
    # kernel size of the depthwise conv across slices (odd; official 3)
    kernel_size: int = 3
    # where the adapters go in each block: "mlp" (official 12x384 recipe), "attn+mlp"
    # (official 24x384 recipe) or "attn"
    placement: str = "mlp"

    def __post_init__(self) -> None:
        if self.width_ratio <= 0:
            raise ValueError(f"width_ratio must be > 0, got {self.width_ratio}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {tuple(PLACEMENTS)}, got '{self.placement}'")


class SliceAdapter(nn.Module):
    """``x + up(conv_T(down(x)))`` on the patch tokens of a block's stream."""

    def __init__(
        self, dim: int, width: int, kernel_size: int, family: str, num_prefix_tokens: int, ctx: SliceContext
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.slice_conv = nn.Conv3d(
            width, width, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0), groups=width
        )
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.slice_conv.weight)
        nn.init.zeros_(self.slice_conv.bias)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        self.family = family
        self.num_prefix_tokens = num_prefix_tokens
        self.slice_context = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B*T, P + Hp*Wp, C) (ViT) or (B*T, Hp, Wp, C) (Swin) -> same shape."""
        prefix, patches = split_patches(x, self.family, self.num_prefix_tokens, self.slice_context)
        num_volumes, num_slices = self.slice_context.volumes(patches.shape[0], "ST-Adapter")
        hidden = grid_to_volume(self.down(patches), num_volumes, num_slices)  # (B, w, T, Hp, Wp)
        update = self.up(volume_to_grid(self.slice_conv(hidden)))  # (B*T, Hp, Wp, C)
        return join_patches(prefix, patches + update, self.family)


@ADAPTERS.register("st-adapter")
class STAdapter(AdapterMethod):
    config_class = STAdapterConfig
    own_patterns = ("*.st_adapter.*",)
    needs_blocks = True

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: STAdapterConfig, ctx: SliceContext) -> None:
        target.track_token_grid(ctx)
        for block in target.blocks:
            width = max(1, int(block.dim * cfg.width_ratio))
            adapters = nn.ModuleDict({
                site: SliceAdapter(block.dim, width, cfg.kernel_size, target.family, target.num_prefix_tokens, ctx)
                for site in PLACEMENTS[cfg.placement]
            })
            block.module.st_adapter = adapters  # names: blocks.i.st_adapter.{attn,mlp}.*
            if "attn" in adapters:  # first: the pre-MLP stash must see the adapted block input
                adapt_block_input(block.module, adapters["attn"])
            if "mlp" in adapters:
                adapt_before_mlp(block.module, adapters["mlp"])
