"""Med-Tuning (MIDL 2024): Med-Adapters that mix the slices of a frozen 2D backbone.

A Med-Adapter follows every frozen block. With x the block output, ``(B*T, L, C)``
(ViT; Swin: ``(B*T, Hp, Wp, C)``) and B volumes of T slices:

    z = GELU(down(x))                                   # (B*T, Hp, Wp, h), h = C / ratio
    z -> (B, h, T, Hp, Wp)
    a = conv1x1( ReLU(BN(dw(3,1,1)(dw(1,3,3) z)))       # intra-stage enhancement
               + ReLU(BN(dw(5,1,1)(dw(1,5,5) z)))
               + |IFFTn(FFTn(z) * w(f_T) + b(f_T))| )    # over (T, Hp, Wp)
    at the last block of every stage s:                 # inter-stage interaction
        a = conv1x1(cat(a, prev(a_{s-1})))              # prev: 1x1x1 (ViT), (1,3,3)/(1,2,2) (Swin)
        a is handed on to stage s + 1                   # a_{-1} = 0 (stage 0 reads a zero map)
    out = x + GELU(up(z + a))

As the official code: four interaction modules for four stages (ViT-B: blocks 2, 5, 8,
11), the first one reading a zero map (``h`` channels at the stage's resolution for
ViT, ``h/2`` at twice it for Swin, as the official ``block_attn``), so its ``prev``
conv contributes its bias (``first_stage_interaction: false`` drops it); ``up`` with
PyTorch's default initialisation (``zero_init_up: true`` starts it at zero, so that
the adapted model starts as the frozen one). With ratio 6 on ViT-B and the official
filter (``filter_slices: 128``) the adapters hold 220,672 parameters per block and
2,845,696 in all, as the official ones.

medtune's choices (each documented where it is made):

- ViT class/register tokens are not adapted: only the patch tokens form the
  ``(T, Hp, Wp)`` volume, prefix tokens pass through unchanged (out = x there). (The
  official ViT has no class token.)
- The frequency filter works for any slice count T (medtune's extension; the official
  filter has one ``w`` and ``b`` per FFT index of exactly 128 slices): ``w`` and ``b``
  are functions of the absolute slice-axis frequency ``|f| in [0, 1/2]`` cycles per
  slice, stored at ``filter_bins`` equally spaced frequencies (both initialised to 1)
  and linearly interpolated at the T frequencies of the current volume. The default 65
  bins are exactly the rfft bins of 128 slices: an official T=128 filter ``(w_t, b_t)``,
  t = 0..127, maps onto it exactly when it is symmetric (``w_t = w_{128-t}``, as at
  initialisation) as ``weight[k] = w_k``, ``bias[k] = b_k`` for k = 0..64; a trained,
  asymmetric one has no exact counterpart (use ``filter_slices: 128``). Since medtune's
  filter is real and symmetric in f, the spectrum stays Hermitian, so the branch is
  computed with ``rfftn``/``irfftn`` (half the work of complex ``fftn``, same result).
  ``filter_slices: T`` gives the official filter (complex ``fftn``, one ``w``/``b`` per
  FFT index, T slices only).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
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
from medtune.errors import ConfigError, DataError


@dataclass
class MedTuningConfig(AdapterConfig):
    """Med-Tuning: a Med-Adapter after every frozen block."""

    method: str = "med-tuning"
    # hidden width h = C / ratio of each Med-Adapter
    ratio: float = 6.0
    # slice-axis frequencies at which the frequency filter's w and b are stored
    # (interpolated for any slice count; 65 = rfft bins of 128 slices)
    filter_bins: int = 65
    # None: medtune's filter above (any slice count); an int T: the official filter, one
    # w and b per FFT index of exactly T slices (the official code: 128)
    filter_slices: int | None = None
    # inter-stage feature interaction at the last block of each stage
    inter_stage: bool = True
    # the first stage's last block interacts too, with a zero "previous" map (official)
    first_stage_interaction: bool = True
    # ViT only: 0-based blocks that close a stage; None: the backbone's out_indices,
    # else each quarter of the depth (ViT-B: 2, 5, 8, 11)
    stage_ends: list[int] | None = None
    # start the up-projection at zero so the adapted model equals the frozen one
    # (official: PyTorch's default initialisation)
    zero_init_up: bool = False

    def __post_init__(self) -> None:
        if self.ratio <= 0:
            raise ValueError(f"ratio must be > 0, got {self.ratio}")
        if self.filter_bins < 2:
            raise ValueError(f"filter_bins must be >= 2, got {self.filter_bins}")
        if self.filter_slices is not None and self.filter_slices < 1:
            raise ValueError(f"filter_slices must be >= 1 or null, got {self.filter_slices}")


def slice_axis_filter(values: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Sample a filter stored at equally spaced frequencies at the fft frequencies of T slices.

    Args:
        values: ``(K,)`` filter values at ``|f| = k / (2 (K - 1))``, k = 0..K-1, i.e.
            from 0 to 1/2 cycles per slice.
        num_slices: T.

    Returns:
        ``(T,)``: the value at each fft index t (frequency ``min(t, T - t) / T``),
        linearly interpolated.
    """
    num_bins = values.shape[0]
    index = torch.arange(num_slices, device=values.device)
    frequency = torch.minimum(index, num_slices - index).to(values.dtype) / num_slices  # [0, 1/2]
    position = frequency * (2 * (num_bins - 1))
    lower = position.floor().long().clamp(max=num_bins - 1)
    upper = (lower + 1).clamp(max=num_bins - 1)
    frac = position - lower.to(values.dtype)
    return values[lower] * (1 - frac) + values[upper] * frac


class SliceFrequencyFilter(nn.Module):
    """``|IFFTn(FFTn(z) * w + b)|`` over (T, Hp, Wp), w and b depending on slice frequency."""

    def __init__(self, filter_bins: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(filter_bins))
        self.bias = nn.Parameter(torch.ones(filter_bins))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, h, T, Hp, Wp) -> (B, h, T, Hp, Wp), non-negative."""
        num_slices, height, width = z.shape[-3:]
        weight = slice_axis_filter(self.weight.float(), num_slices)[:, None, None]  # (T, 1, 1)
        bias = slice_axis_filter(self.bias.float(), num_slices)[:, None, None]
        # FFTs in float32: bf16 has no FFT kernels and fp16 ones need powers of two
        spectrum = torch.fft.rfftn(z.float(), dim=(-3, -2, -1))  # (B, h, T, Hp, Wp//2+1)
        filtered = torch.fft.irfftn(spectrum * weight + bias, s=(num_slices, height, width), dim=(-3, -2, -1))
        return filtered.abs().to(z.dtype)


class SliceIndexFilter(nn.Module):
    """The official filter: ``|IFFTn(FFTn(z) * w_t + b_t)|`` over (T, Hp, Wp), one ``w_t``,
    ``b_t`` per FFT index t of exactly ``num_slices`` slices (both initialised to 1)."""

    def __init__(self, num_slices: int) -> None:
        super().__init__()
        self.num_slices = num_slices
        self.weight = nn.Parameter(torch.ones(num_slices))
        self.bias = nn.Parameter(torch.ones(num_slices))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, h, T, Hp, Wp) -> (B, h, T, Hp, Wp), non-negative."""
        if z.shape[-3] != self.num_slices:
            raise DataError(
                f"Med-Adapter filter_slices is {self.num_slices} but the volume has {z.shape[-3]} slices "
                "(filter_slices: null works for any slice count)"
            )
        weight, bias = self.weight.float()[:, None, None], self.bias.float()[:, None, None]  # (T, 1, 1)
        spectrum = torch.fft.fftn(z.float(), dim=(-3, -2, -1))  # (B, h, T, Hp, Wp) complex
        return torch.fft.ifftn(spectrum * weight + bias, dim=(-3, -2, -1)).abs().to(z.dtype)


class DepthwiseSliceConv(nn.Sequential):
    """Depthwise (1,k,k) in-slice conv, then depthwise (k,1,1) across slices, BN, ReLU.

    The weights live in ``nn.Conv3d`` modules (the official layout and state-dict
    names), but the two convs run as 2D depthwise convs on views of the volume: the
    (1,k,k) conv over ``(B, h*T, Hp, Wp)`` with each channel's kernel repeated for its
    T slices, the (k,1,1) conv over ``(B, h, T, Hp*Wp)`` with a (k,1) kernel. Same
    values and gradients (to float rounding) as the Conv3d modules' own forward, and
    1.4-2x faster (forward + backward) on CPU, where PyTorch has no depthwise 3D conv kernel.
    """

    def __init__(self, chans: int, kernel: int) -> None:
        pad = kernel // 2
        super().__init__(
            nn.Conv3d(chans, chans, (1, kernel, kernel), padding=(0, pad, pad), groups=chans),
            nn.Conv3d(chans, chans, (kernel, 1, 1), padding=(pad, 0, 0), groups=chans),
            nn.BatchNorm3d(chans),
            nn.ReLU(inplace=True),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, h, T, Hp, Wp) -> (B, h, T, Hp, Wp)."""
        in_slice, across_slices, norm, act = self
        batch, chans, num_slices, height, width = z.shape
        kernel = in_slice.kernel_size[-1]
        weight = in_slice.weight.squeeze(2).repeat_interleave(num_slices, dim=0)  # (h*T, 1, k, k)
        bias = in_slice.bias.repeat_interleave(num_slices)  # channel c*T + t of the view
        y = F.conv2d(z.reshape(batch, chans * num_slices, height, width), weight, bias,
                     padding=kernel // 2, groups=chans * num_slices)  # (B, h*T, Hp, Wp)
        y = F.conv2d(y.reshape(batch, chans, num_slices, height * width), across_slices.weight.squeeze(-1),
                     across_slices.bias, padding=(kernel // 2, 0), groups=chans)  # (B, h, T, Hp*Wp)
        return act(norm(y.reshape(batch, chans, num_slices, height, width)))


class IntraStageEnhancement(nn.Module):
    """Three parallel branches (3x3x3 and 5x5x5 factorised depthwise, frequency) summed, then 1x1x1."""

    def __init__(self, chans: int, filter_bins: int, filter_slices: int | None = None) -> None:
        super().__init__()
        self.branch3 = DepthwiseSliceConv(chans, 3)
        self.branch5 = DepthwiseSliceConv(chans, 5)
        self.frequency = SliceFrequencyFilter(filter_bins) if filter_slices is None else SliceIndexFilter(filter_slices)
        self.fuse = nn.Conv3d(chans, chans, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, h, T, Hp, Wp) -> (B, h, T, Hp, Wp)."""
        return self.fuse(self.branch3(z) + self.branch5(z) + self.frequency(z))


class InterStageInteraction(nn.Module):
    """Mix this stage's map with the previous stage's: conv1x1(cat(a, prev(a_prev)))."""

    def __init__(self, chans: int, prev_chans: int, downsample: bool) -> None:
        super().__init__()
        if downsample:  # Swin: the previous stage has twice the resolution
            self.previous = nn.Conv3d(prev_chans, chans, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        else:
            self.previous = nn.Conv3d(prev_chans, chans, 1)
        self.mix = nn.Conv3d(2 * chans, chans, 1)

    def forward(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """current (B, h, T, Hp, Wp), previous (B, h', T, Hp', Wp') -> (B, h, T, Hp, Wp)."""
        return self.mix(torch.cat([current, self.previous(previous)], dim=1))

    def zero_previous(self, current: torch.Tensor) -> torch.Tensor:
        """The first stage's "previous" map: zeros of ``h'`` channels at the previous-stage
        resolution (twice ``current``'s for Swin), as the official ``block_attn``."""
        batch, _, num_slices, height, width = current.shape
        factor = self.previous.stride[-1]
        return current.new_zeros(batch, self.previous.in_channels, num_slices, height * factor, width * factor)


def hidden_width(dim: int, ratio: float) -> int:
    """h = C / ratio, rounded down as in the official code (ViT-B: 768 / 6 = 128)."""
    return max(1, int(dim / ratio))


class MedAdapter(nn.Module):
    """A Med-Adapter following one frozen block (see the module docstring).

    Args:
        dim: token channels C.
        ratio: h = C / ratio.
        filter_bins: frequencies at which the slice filter is stored.
        filter_slices: None, or T for the official per-FFT-index filter of T slices.
        stage: stage index of the block.
        hands_on: whether this block closes a stage whose map the next stage reads.
        interaction: the inter-stage interaction (last block of a stage), or None.
        family, num_prefix_tokens: the backbone's token layout.
        ctx: the backbone's :class:`SliceContext`.
        zero_init_up: start ``up`` at zero (the adapter starts as the identity).
    """

    def __init__(
        self,
        dim: int,
        ratio: float,
        filter_bins: int,
        stage: int,
        hands_on: bool,
        interaction: InterStageInteraction | None,
        family: str,
        num_prefix_tokens: int,
        ctx: SliceContext,
        zero_init_up: bool = False,
        filter_slices: int | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden_width(dim, ratio)
        self.down = nn.Linear(dim, hidden)
        self.enhance = IntraStageEnhancement(hidden, filter_bins, filter_slices)
        self.interaction = interaction
        self.up = nn.Linear(hidden, dim)
        if zero_init_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.stage = stage
        self.hands_on = hands_on
        self.family = family
        self.num_prefix_tokens = num_prefix_tokens
        self.slice_context = ctx

    def extra_repr(self) -> str:
        return f"stage={self.stage}, hands_on={self.hands_on}, family={self.family}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: block output, (B*T, P + Hp*Wp, C) for ViT or (B*T, Hp, Wp, C) for Swin; same shape out."""
        ctx = self.slice_context
        prefix, patches = split_patches(x, self.family, self.num_prefix_tokens, ctx)  # (B*T, Hp, Wp, C)
        num_volumes, num_slices = ctx.volumes(patches.shape[0], f"Med-Adapter (stage {self.stage})")
        z = F.gelu(self.down(patches))  # (B*T, Hp, Wp, h)
        z = grid_to_volume(z, num_volumes, num_slices)  # (B, h, T, Hp, Wp)
        a = self.enhance(z)
        if self.interaction is not None and self.stage == 0:
            a = self.interaction(a, self.interaction.zero_previous(a))
        elif self.interaction is not None:
            previous = ctx.stage_maps.get(self.stage - 1)
            if previous is None or previous.shape[0] != num_volumes or previous.shape[2] != num_slices:
                raise RuntimeError(
                    f"Med-Adapter of stage {self.stage} found no map of stage {self.stage - 1} "
                    "from this forward (blocks run out of order?)"
                )
            a = self.interaction(a, previous)
        if self.hands_on:
            ctx.stage_maps[self.stage] = a
        update = F.gelu(self.up(volume_to_grid(z + a)))  # (B*T, Hp, Wp, C)
        return join_patches(prefix, patches + update, self.family)


def _run_after_block(adapter: nn.Module, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return adapter(output)


@ADAPTERS.register("med-tuning")
class MedTuning(AdapterMethod):
    """Inject a :class:`MedAdapter` after every block of a timm ViT or Swin."""

    config_class = MedTuningConfig
    own_patterns = ("*.med_adapter.*",)
    needs_blocks = True

    @classmethod
    def default_extras(cls, family: str) -> tuple[str, ...]:
        # the paper trains the position embedding and the final norm besides the adapters;
        # Swin has no absolute position embedding by default (relative tables stay frozen,
        # as in the official code)
        if family == "vit":
            return ("pos_embed", "norm.*")
        return ("absolute_pos_embed", "norm.*")

    @classmethod
    def stage_ends(cls, cfg: AdapterConfig) -> list[int] | None:
        return cfg.stage_ends

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: MedTuningConfig, ctx: SliceContext) -> None:
        target.track_token_grid(ctx)
        stage_dims = {b.stage: b.dim for b in target.blocks}
        last_stage = max(stage_dims)
        for block in target.blocks:
            interaction = None
            first = block.stage == 0
            if cfg.inter_stage and block.is_stage_end and (not first or cfg.first_stage_interaction):
                hidden = hidden_width(block.dim, cfg.ratio)
                swin = target.family == "swin"
                # the stage before the first: the official zero map (Swin: C/2 channels)
                prev_dim = stage_dims[block.stage - 1] if not first else (block.dim // 2 if swin else block.dim)
                interaction = InterStageInteraction(hidden, hidden_width(prev_dim, cfg.ratio), downsample=swin)
            adapter = MedAdapter(
                dim=block.dim,
                ratio=cfg.ratio,
                filter_bins=cfg.filter_bins,
                stage=block.stage,
                hands_on=cfg.inter_stage and block.is_stage_end and block.stage < last_stage,
                interaction=interaction,
                family=target.family,
                num_prefix_tokens=target.num_prefix_tokens,
                ctx=ctx,
                zero_init_up=cfg.zero_init_up,
                filter_slices=cfg.filter_slices,
            )
            if hasattr(block.module, "med_adapter"):
                raise ConfigError(f"block '{block.name}' already has a med_adapter")
            block.module.med_adapter = adapter
            block.module.register_forward_hook(partial(_run_after_block, adapter))
