"""Pretraining objectives by name: ``ObjectiveConfig``, ``OBJECTIVES``, ``build_objective``.

Each objective is an ``nn.Module`` built around a backbone; it keeps the backbone as its
``.backbone`` attribute (so ``objective.backbone.state_dict()`` is what
``backbone.safetensors`` holds) and ``forward(batch)`` returns a dict with a scalar
``"loss"`` plus scalar logs, as ``medtune.trainer.train`` expects::

    objective = build_objective(ObjectiveConfig(name="fremae"), backbone)
    out = objective({"image": x, "foreground": fg})   # x (B, M, *S), fg (B, *S)
    out["loss"].backward()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from medtune.errors import ConfigError
from medtune.pretrain.frequency import FILTER_KINDS
from medtune.registry import Registry

OBJECTIVES: Registry[Callable[["ObjectiveConfig", nn.Module], nn.Module]] = Registry("objective")

# Per-objective defaults for the fields left as None.
DEFAULT_MASK_RATIO = {"fremae": 0.25, "mae": 0.75, "simmim": 0.6, "mfm": 0.0}


@dataclass
class ObjectiveConfig:
    """What the pretraining objective is and how it masks, predicts and scores.

    Attributes:
        name: ``"fremae"`` (frequency targets, multi-stage decoder), ``"mae"`` (ViT
            only), ``"simmim"`` or ``"mfm"``.
        mask_ratio: fraction masked; None = the objective's default (FreMAE 0.25 of the
            foreground pixels, MAE 0.75 of the patches, SimMIM 0.6 of the patches;
            unused by MFM).
        mask_mode: FreMAE only. ``"pixel"``: per-pixel foreground masking with a
            learnable per-modality token (the paper); ``"patch"``: MAE-style, mask whole
            patches and encode only the visible tokens (ViT backbones only).
        mask_scope: FreMAE pixel masking. ``"sample"``: each sample loses ``mask_ratio``
            of its own foreground; ``"batch"``: drawn over the whole batch (official code).
        jitter: FreMAE pixel masking. Masked inputs are scaled by ``U(1-j, 1+j)`` and
            shifted by ``U(-j, j)`` per (sample, modality); 0 disables.
        radius: band radius in frequency bins. FreMAE: half-width of the central square
            (or circle radius), default 10. MFM: None = 16 at 224 px, scaled with the
            image side.
        filter_kind: ``"square"`` (symmetric, ``2r + 1`` bins per axis),
            ``"square_official"`` (FreMIM's ``2r``-bin slice ``[n//2 - r, n//2 + r)``)
            or ``"circle"``; None = square for FreMAE, circle for MFM (see
            :mod:`medtune.pretrain.frequency`).
        low_pool: FreMAE. The low band is taken from the image average-pooled by this
            factor (128 -> 32); the bottom-up head predicts at that size.
        high_weight: FreMAE weight of the high-band loss.
        low_weight: FreMAE weight of the low-band loss.
        loss: FreMAE. ``"frequency"``: focal frequency loss on the bands (the paper);
            ``"pixel"``: MSE in image space on the same predictions (for comparisons).
        focal_alpha: exponent of the focal frequency weight ``log(1 + d^alpha)``; for MFM
            0 gives a plain (unweighted) frequency MSE.
        decoder_width: channels of FreMAE's multi-stage decoder paths.
        filter_per_channel: FreMAE global filters with one transfer function per channel
            (official) or one shared by all channels (far fewer parameters for 3D).
        decoder_dim: MAE transformer decoder width.
        decoder_depth: MAE transformer decoder blocks.
        decoder_heads: MAE transformer decoder attention heads.
        norm_pix_loss: MAE. Normalise each target patch by its mean and std.
        mask_block: SimMIM. Side, in pixels, of the square blocks that are masked
            together (32 in SimMIM); must be a multiple of the patch-embedding stride.
        mfm_band: MFM. Which band is removed from the input and predicted: ``"low"``,
            ``"high"``, or ``"random"`` (one of the two per sample, p = 0.5, as MFM).
    """

    name: str = "fremae"
    mask_ratio: float | None = None
    mask_mode: str = "pixel"
    mask_scope: str = "sample"
    jitter: float = 0.1
    radius: float | None = None
    filter_kind: str | None = None
    low_pool: int = 4
    high_weight: float = 1.0
    low_weight: float = 1.3
    loss: str = "frequency"
    focal_alpha: float = 1.0
    decoder_width: int = 32
    filter_per_channel: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    mask_block: int = 32
    mfm_band: str = "random"

    def __post_init__(self) -> None:
        choices = {
            "mask_mode": ("pixel", "patch"),
            "mask_scope": ("sample", "batch"),
            "loss": ("frequency", "pixel"),
            "mfm_band": ("low", "high", "random"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"objective.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.filter_kind not in (None, *FILTER_KINDS):
            raise ValueError(f"objective.filter_kind must be one of {FILTER_KINDS}, got {self.filter_kind!r}")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.radius is not None and self.radius < 0:
            raise ValueError(f"objective.radius must be >= 0, got {self.radius}")
        if self.low_pool < 1 or self.mask_block < 1 or self.decoder_width < 1:
            raise ValueError("objective.low_pool, mask_block and decoder_width must be >= 1")

    def resolved_mask_ratio(self) -> float:
        return DEFAULT_MASK_RATIO.get(self.name, 0.0) if self.mask_ratio is None else self.mask_ratio


def build_objective(cfg: ObjectiveConfig, backbone: nn.Module) -> nn.Module:
    """The objective ``cfg.name`` around ``backbone`` (a :class:`medtune.models.Backbone`)."""
    if not isinstance(cfg, ObjectiveConfig):
        raise ConfigError(f"build_objective needs an ObjectiveConfig, got {type(cfg).__name__}")
    return OBJECTIVES.get(cfg.name)(cfg, backbone)


@OBJECTIVES.register("fremae")
def build_fremae(cfg: ObjectiveConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.fremae import FreMAE

    return FreMAE(backbone, cfg)


@OBJECTIVES.register("mae")
def build_mae(cfg: ObjectiveConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.mae import MAE

    return MAE(
        backbone,
        mask_ratio=cfg.resolved_mask_ratio(),
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        norm_pix_loss=cfg.norm_pix_loss,
    )


@OBJECTIVES.register("simmim")
def build_simmim(cfg: ObjectiveConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.simmim import SimMIM

    return SimMIM(backbone, mask_ratio=cfg.resolved_mask_ratio(), mask_block=cfg.mask_block)


@OBJECTIVES.register("mfm")
def build_mfm(cfg: ObjectiveConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.mfm import MFM

    return MFM(
        backbone,
        radius=cfg.radius,
        filter_kind=cfg.filter_kind or "circle",
        band=cfg.mfm_band,
        focal_alpha=cfg.focal_alpha,
    )


__all__ = ["ObjectiveConfig", "OBJECTIVES", "build_objective", "DEFAULT_MASK_RATIO"]
