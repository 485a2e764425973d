"""Where adapters go: the blocks of a timm ViT or Swin, and their token layouts.

Adapters never change timm's classes. They are registered as child modules of the
block they adapt (``blocks.3.med_adapter``) and run through forward hooks, so every
frozen tensor keeps its timm name and pretrained/backbone weight files keep loading.

Token layouts inside a block (timm 1.0):

- ViT: ``(N, P + Hp*Wp, C)``, ``P`` prefix tokens (class/register) first.
- Swin: ``(N, Hp, Wp, C)`` (NHWC).

:func:`split_patches` / :func:`join_patches` turn both into a patch grid
``(N, Hp, Wp, C)`` plus the untouched prefix tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from medtune.adapters.context import SliceContext
from medtune.errors import ConfigError


@dataclass
class AdaptedBlock:
    """One transformer block an adapter may attach to.

    Attributes:
        name: module name relative to the timm model, e.g. ``"blocks.3"``,
            ``"layers.1.blocks.0"``.
        module: the timm block.
        dim: channels C of its tokens.
        stage: index of the stage it belongs to (ViT: quarter of the depth).
        is_stage_end: whether it is the last block of its stage.
    """

    name: str
    module: nn.Module
    dim: int
    stage: int
    is_stage_end: bool


@dataclass
class AdapterTarget:
    """A backbone as adapters see it.

    Attributes:
        root: the module given to ``apply_adapter`` (a medtune ``Backbone`` or a bare
            timm model); state-dict names are relative to it.
        model: the network inside (``root.model`` or ``root`` itself).
        prefix: name prefix of ``model`` inside ``root`` (``"model."`` or ``""``).
        family: ``"vit"``, ``"swin"`` or ``"other"`` (only whole-model methods and LoRA).
        name: backbone name written to ``adapter.json``.
        blocks: the blocks in forward order (empty for ``"other"``).
        num_prefix_tokens: ViT class/register tokens ahead of the patch tokens.
    """

    root: nn.Module
    model: nn.Module
    prefix: str
    family: str
    name: str
    blocks: list[AdaptedBlock] = field(default_factory=list)
    num_prefix_tokens: int = 0

    def require_blocks(self, method: str) -> None:
        if not self.blocks:
            raise ConfigError(
                f"adapter '{method}' needs a timm ViT or Swin backbone; "
                f"'{self.name}' ({type(self.model).__name__}) is not one"
            )

    def track_token_grid(self, ctx: SliceContext) -> None:
        """Record the ViT patch grid of each forward in ``ctx`` (Swin needs none)."""
        if self.family == "vit":
            self.model.patch_embed.register_forward_pre_hook(_RecordGrid(ctx))


class _RecordGrid:
    """Picklable pre-hook object calling :meth:`SliceContext.record_token_grid`."""

    def __init__(self, ctx: SliceContext) -> None:
        self.slice_context = ctx

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.slice_context.record_token_grid(module, args)


# --------------------------------------------------------------------------- the residual stream
#
# A timm ViT or Swin block is ``x = x + drop_path1(attn(norm1(x)))`` then
# ``x = x + drop_path2(mlp(norm2(x)))``. The stream between the two sublayers (``x_mid``)
# is where AdaptFormer reads and where ST-Adapter's pre-MLP adapter writes; hooks on the
# block's own submodules reach it without changing timm's classes.


class _StashInput:
    """Pre-hook keeping its module's input for a later hook of the same forward."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def pop(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("adapter hook: the block's stream was not recorded in this forward")
        return value


class _AddBesideMLP:
    """``drop_path2`` hook: the MLP branch plus ``branch(x_mid)`` (``x_mid`` = ``norm2``'s input)."""

    def __init__(self, branch: nn.Module, stream: _StashInput) -> None:
        self.branch = branch
        self.stream = stream

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.branch(self.stream.pop())


def add_beside_mlp(block: nn.Module, branch: nn.Module) -> None:
    """Make ``block`` compute ``x_mid + mlp(norm2(x_mid)) + branch(x_mid)``.

    ``branch`` reads the residual stream ``x_mid`` (not ``norm2(x_mid)``) and its output
    joins after the MLP's drop-path, as a parallel adapter does (AdaptFormer). ``x_mid``
    has the layout ``norm2`` sees (ViT ``(N, L, C)``, Swin ``(N, H*W, C)``): ``branch`` must
    be token-wise.
    """
    stream = _StashInput()
    block.norm2.register_forward_pre_hook(stream)
    block.drop_path2.register_forward_hook(_AddBesideMLP(branch, stream))


class _AdaptAfterAttention:
    """``drop_path1`` hook: returns ``adapter(x + h) - x`` so that the block's residual
    add gives ``adapter(x_mid)``."""

    def __init__(self, adapter: nn.Module, block_input: _StashInput) -> None:
        self.adapter = adapter
        self.block_input = block_input

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = self.block_input.pop()
        return self.adapter(x + output) - x


def adapt_before_mlp(block: nn.Module, adapter: nn.Module) -> None:
    """Replace ``block``'s stream between attention and MLP by ``adapter(x_mid)``.

    The MLP then reads, and the residual carries, the adapted stream (ST-Adapter's
    pre-MLP placement). ``x_mid`` has the block's input layout (ViT ``(N, P + L, C)``,
    Swin ``(N, H, W, C)``). Input pre-hooks registered earlier (a pre-attention adapter)
    run first, so ``x`` is the stream the attention actually read.
    """
    block_input = _StashInput()
    block.register_forward_pre_hook(block_input)
    block.drop_path1.register_forward_hook(_AdaptAfterAttention(adapter, block_input))


class _AdaptInput:
    """Block pre-hook: the block reads ``adapter(x)`` instead of ``x``."""

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.adapter(args[0]), *args[1:])


def adapt_block_input(block: nn.Module, adapter: nn.Module) -> None:
    """The block reads ``adapter(x)`` (a pre-attention adapter: attention and residual see it)."""
    block.register_forward_pre_hook(_AdaptInput(adapter))


def quarter_stage_ends(depth: int, num_stages: int = 4) -> tuple[int, ...]:
    """Last block (0-based) of each of ``num_stages`` equal groups: 12 -> (2, 5, 8, 11)."""
    ends = sorted({round(depth * (i + 1) / num_stages) - 1 for i in range(num_stages)})
    return tuple(end for end in ends if end >= 0)


def _backbone_name(root: nn.Module, model: nn.Module) -> str:
    config = getattr(root, "config", None)
    if getattr(config, "name", None):
        return str(config.name)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(pretrained_cfg.get("architecture") or type(model).__name__)


def inspect_backbone(root: nn.Module, stage_ends: list[int] | None = None) -> AdapterTarget:
    """Find the timm network in ``root`` and list its blocks and stages.

    Args:
        root: a medtune ``Backbone`` (``root.model`` is the timm network) or a timm model.
        stage_ends: ViT only: 0-based indices of the blocks that close a stage. None:
            the backbone's ``out_indices`` (the stages its decoder reads), else each
            quarter of the depth (ViT-B: 2, 5, 8, 11).
    """
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    model = root.model if isinstance(getattr(root, "model", None), nn.Module) else root
    prefix = "model." if model is not root else ""
    target = AdapterTarget(root, model, prefix, "other", _backbone_name(root, model))

    if isinstance(model, VisionTransformer):
        depth = len(model.blocks)
        if stage_ends is None:
            stage_ends = list(getattr(root, "out_indices", None) or quarter_stage_ends(depth))
        ends = sorted(int(i) for i in stage_ends)
        if not ends or ends[0] < 0 or ends[-1] >= depth:
            raise ConfigError(f"stage_ends {stage_ends} must be block indices in [0, {depth - 1}]")
        target.family = "vit"
        target.num_prefix_tokens = int(model.num_prefix_tokens)
        for index, block in enumerate(model.blocks):
            stage = sum(end < index for end in ends)
            target.blocks.append(
                AdaptedBlock(f"blocks.{index}", block, int(model.embed_dim), stage, index in ends)
            )
    elif isinstance(model, SwinTransformer):
        if stage_ends is not None:
            raise ConfigError("stage_ends is for ViT; Swin stages end at the last block of each layer")
        target.family = "swin"
        for stage, layer in enumerate(model.layers):
            depth = len(layer.blocks)
            for index, block in enumerate(layer.blocks):
                target.blocks.append(
                    AdaptedBlock(
                        f"layers.{stage}.blocks.{index}", block, int(block.dim), stage, index == depth - 1
                    )
                )
    return target


def split_patches(
    x: torch.Tensor, family: str, num_prefix_tokens: int, ctx: SliceContext | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Block tokens -> (prefix tokens ``(N, P, C)`` or None, patch grid ``(N, Hp, Wp, C)``)."""
    if family == "swin":
        return None, x
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    num_images, num_patches, chans = patches.shape
    grid = ctx.token_grid if ctx is not None else None
    if grid is None or grid[0] * grid[1] != num_patches:
        raise ConfigError(
            f"ViT tokens {tuple(x.shape)}: patch grid unknown for {num_patches} patch tokens "
            f"(recorded grid {grid}); the adapter must be applied with apply_adapter"
        )
    return (prefix if num_prefix_tokens else None), patches.reshape(num_images, grid[0], grid[1], chans)


def join_patches(prefix: torch.Tensor | None, patches: torch.Tensor, family: str) -> torch.Tensor:
    """Inverse of :func:`split_patches`."""
    if family == "swin":
        return patches
    tokens = patches.flatten(1, 2)  # (N, Hp*Wp, C)
    return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)


def grid_to_volume(grid: torch.Tensor, num_volumes: int, num_slices: int) -> torch.Tensor:
    """``(B*T, Hp, Wp, C)`` -> ``(B, C, T, Hp, Wp)`` (image ``b*T + t`` is slice t of volume b)."""
    _, height, width, chans = grid.shape
    return grid.reshape(num_volumes, num_slices, height, width, chans).permute(0, 4, 1, 2, 3)


def volume_to_grid(volume: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, Hp, Wp)`` -> ``(B*T, Hp, Wp, C)``, the inverse of :func:`grid_to_volume`."""
    batch, chans, num_slices, height, width = volume.shape
    return volume.permute(0, 2, 3, 4, 1).reshape(batch * num_slices, height, width, chans)
