"""VPT-deep (Jia et al., ECCV 2022): learned prompt tokens at every ViT block.

Before block i, ``num_tokens`` prompts of that block are inserted after the prefix
(class/register) tokens; after the block they are dropped again, so every block sees
fresh prompts and the token count outside the blocks never changes. ViT only: Swin's
window attention has no place for global tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterMethod
from medtune.adapters.targets import AdapterTarget
from medtune.errors import ConfigError


@dataclass
class VPTConfig(AdapterConfig):
    """VPT-deep: ``num_tokens`` learned prompts per ViT block."""

    method: str = "vpt"
    # prompt tokens per block
    num_tokens: int = 10
    # dropout on the prompts
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")


class DeepPrompts(nn.Module):
    """The prompts of one block, ``(num_tokens, C)``, uniform-initialised as in VPT."""

    def __init__(self, dim: int, num_tokens: int, patch_area: int, dropout: float, num_prefix_tokens: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_area + dim))  # VPT's Xavier bound over the patch fan-in
        self.prompt = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.num_prefix_tokens = num_prefix_tokens

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, P + L, C) -> (N, P + num_tokens + L, C)."""
        prompts = self.dropout(self.prompt).to(x.dtype).expand(x.shape[0], -1, -1)
        split = self.num_prefix_tokens
        return torch.cat([x[:, :split], prompts, x[:, split:]], dim=1)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, P + num_tokens + L, C) -> (N, P + L, C)."""
        split = self.num_prefix_tokens
        return torch.cat([x[:, :split], x[:, split + self.prompt.shape[0]:]], dim=1)


def _insert_prompts(prompts: DeepPrompts, block: nn.Module, args: tuple) -> tuple:
    return (prompts.insert(args[0]), *args[1:])


def _remove_prompts(prompts: DeepPrompts, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return prompts.remove(output)


@ADAPTERS.register("vpt")
class VPTDeep(AdapterMethod):
    config_class = VPTConfig
    own_patterns = ("*.vpt.*",)
    needs_blocks = True

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: VPTConfig, ctx: SliceContext) -> None:
        if target.family != "vit":
            raise ConfigError(
                f"adapter 'vpt' (VPT-deep) supports ViT backbones only; '{target.name}' is {target.family}"
            )
        patch_h, patch_w = target.model.patch_embed.patch_size
        for block in target.blocks:
            prompts = DeepPrompts(block.dim, cfg.num_tokens, patch_h * patch_w, cfg.dropout, target.num_prefix_tokens)
            block.module.vpt = prompts
            block.module.register_forward_pre_hook(partial(_insert_prompts, prompts))
            block.module.register_forward_hook(partial(_remove_prompts, prompts))
