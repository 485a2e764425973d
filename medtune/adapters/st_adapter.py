"""ST-Adapter (Pan et al., NeurIPS 2022) across slices: down, depthwise conv over T, up.

Before each block's attention (i.e. on the block's input):

    x = x + up(conv_T(down(x)))      # conv_T: depthwise (k,1,1) over (T, Hp, Wp)

with ``down`` to C * width_ratio channels (C/2) and ``up`` zero-initialised, so the
adapted model starts as the frozen one. Like the Med-Adapter it needs the slice count
(see :mod:`medtune.adapters.context`); ViT prefix tokens pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterMethod
from medtune.adapters.targets import (
    AdapterTarget,
    grid_to_volume,
    join_patches,
    split_patches,
    volume_to_grid,
)


@dataclass
class STAdapterConfig(AdapterConfig):
    """ST-Adapter: a slice-mixing bottleneck before every block."""

    method: str = "st-adapter"
    # bottleneck width as a fraction of the block's channels C
    width_ratio: float = 0.5
    # kernel size of the depthwise conv across slices (odd)
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.width_ratio <= 0:
            raise ValueError(f"width_ratio must be > 0, got {self.width_ratio}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")


class SliceAdapter(nn.Module):
    """``x + up(conv_T(down(x)))`` on the patch tokens of a block's input."""

    def __init__(
        self, dim: int, width: int, kernel_size: int, family: str, num_prefix_tokens: int, ctx: SliceContext
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.slice_conv = nn.Conv3d(
            width, width, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0), groups=width
        )
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
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


def _adapt_input(adapter: nn.Module, block: nn.Module, args: tuple) -> tuple:
    return (adapter(args[0]), *args[1:])


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
            adapter = SliceAdapter(
                block.dim, width, cfg.kernel_size, target.family, target.num_prefix_tokens, ctx
            )
            block.module.st_adapter = adapter
            block.module.register_forward_pre_hook(partial(_adapt_input, adapter))
