"""How adapters learn the slice count T of the volumes in a batch of 2D slices.

A frozen 2D backbone sees a volume ``(B, M, H, W, T)`` (slice axis last, MONAI-style)
as ``B*T`` images ``(B*T, M, H, W)``, ordered volume-major: image ``b*T + t`` is slice
``t`` of volume ``b`` (:func:`volume_to_slices`). Only adapters mix slices, so they must
know ``T``. :func:`apply_adapter` gives every slice-aware adapter of one backbone the
same :class:`SliceContext`; the caller that lays out the slices sets ``T`` on it::

    set_num_slices(model, T)               # stays set until changed
    with slice_context(model, T):          # or only for one forward
        stages = backbone.forward_stages(volume_to_slices(volume))

A slice-aware adapter that runs with no ``T`` set raises :class:`ConfigError` (use
``T=1`` for plain 2D images); a batch that is not a whole number of volumes raises
:class:`DataError`. The context also carries what one forward pass hands between
blocks: the ViT token grid (recorded from the patch embedding's input) and the
Med-Adapter's stage maps (inter-stage interaction).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from medtune.errors import ConfigError, DataError


@dataclass
class SliceContext:
    """State shared by the slice-aware adapters of one backbone.

    Attributes:
        num_slices: T, the slices per volume of the current batch (None: not set).
        token_grid: (Hp, Wp) patch grid of the current ViT input, recorded by a
            pre-hook on the patch embedding (None for Swin, whose tokens are NHWC).
        stage_maps: Med-Adapter map of each finished stage of the current forward,
            ``{stage: (B, h_stage, T, Hp, Wp)}``, read by the next stage's last block.
    """

    num_slices: int | None = None
    token_grid: tuple[int, int] | None = None
    stage_maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def volumes(self, num_images: int, who: str) -> tuple[int, int]:
        """``B*T`` images -> ``(B, T)``; errors name the adapter ``who``."""
        num_slices = self.num_slices
        if num_slices is None:
            raise ConfigError(
                f"{who} mixes slices but the slice count is not set; call "
                "medtune.adapters.set_num_slices(model, T) before the forward (T=1 for 2D images)"
            )
        if num_images % num_slices:
            raise DataError(
                f"{who}: a batch of {num_images} slices is not a whole number of volumes "
                f"of {num_slices} slices"
            )
        return num_images // num_slices, num_slices

    def record_token_grid(self, patch_embed: nn.Module, args: tuple) -> None:
        """Forward pre-hook of a timm ``PatchEmbed``: remember the patch grid of ``args[0]``."""
        height, width = args[0].shape[-2:]
        if hasattr(patch_embed, "dynamic_feat_size"):
            self.token_grid = tuple(patch_embed.dynamic_feat_size((height, width)))
        else:
            patch_h, patch_w = patch_embed.patch_size
            self.token_grid = (height // patch_h, width // patch_w)


def find_slice_contexts(model: nn.Module) -> list[SliceContext]:
    """The distinct :class:`SliceContext` objects held by modules of ``model``."""
    found: dict[int, SliceContext] = {}
    for module in model.modules():
        ctx = getattr(module, "slice_context", None)
        if isinstance(ctx, SliceContext):
            found.setdefault(id(ctx), ctx)
    return list(found.values())


def _check_num_slices(num_slices: int | None) -> None:
    if num_slices is not None and (
        isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1
    ):
        raise ConfigError(f"number of slices must be a positive int, got {num_slices!r}")


def set_num_slices(model: nn.Module, num_slices: int | None) -> None:
    """Tell every slice-aware adapter in ``model`` that volumes have ``num_slices`` slices.

    A model without slice-aware adapters (LoRA, full finetuning, ...) is left as is,
    so callers may call this for any method.
    """
    _check_num_slices(num_slices)
    for ctx in find_slice_contexts(model):
        ctx.num_slices = num_slices


@contextlib.contextmanager
def slice_context(model: nn.Module, num_slices: int) -> Iterator[None]:
    """Set the slice count for the ``with`` body, then restore it and drop stage maps."""
    _check_num_slices(num_slices)
    contexts = find_slice_contexts(model)
    previous = [ctx.num_slices for ctx in contexts]
    for ctx in contexts:
        ctx.num_slices = num_slices
    try:
        yield
    finally:
        for ctx, old in zip(contexts, previous):
            ctx.num_slices = old
            ctx.stage_maps.clear()


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """``(B, M, H, W, T)`` -> ``(B*T, M, H, W)``, image ``b*T + t`` = slice ``t`` of volume ``b``."""
    if volume.ndim != 5:
        raise DataError(f"volume has shape {tuple(volume.shape)}; expected (B, M, H, W, T)")
    batch, chans, height, width, num_slices = volume.shape
    return volume.permute(0, 4, 1, 2, 3).reshape(batch * num_slices, chans, height, width)


def slices_to_volume(slices: torch.Tensor, num_slices: int) -> torch.Tensor:
    """``(B*T, C, H, W)`` -> ``(B, C, H, W, T)``, the inverse of :func:`volume_to_slices`."""
    if slices.ndim != 4 or slices.shape[0] % num_slices:
        raise DataError(
            f"slices have shape {tuple(slices.shape)}; expected (B*T, C, H, W) with T={num_slices}"
        )
    images, chans, height, width = slices.shape
    volume = slices.reshape(images // num_slices, num_slices, chans, height, width)
    return volume.permute(0, 2, 3, 4, 1)
