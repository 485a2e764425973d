"""Pretraining objectives by name: their configs, ``OBJECTIVES`` and ``build_objective``.

Each objective has its own config dataclass with only its own fields, deriving from
:class:`ObjectiveConfig`; ``objective.name`` in a recipe picks it (a tagged union, see
:mod:`medtune.config`), so a key of another objective is an error.

Each objective is an ``nn.Module`` built around a backbone; it keeps the backbone as its
``.backbone`` attribute (so ``objective.backbone.state_dict()`` is what
``backbone.safetensors`` holds) and ``forward(batch)`` returns a dict with a scalar
``"loss"`` plus scalar logs, as ``medtune.trainer.train`` expects::

    objective = build_objective(FreMAEConfig(), backbone)   # or MAEConfig(decoder_dim=256), ...
    out = objective({"image": x, "foreground": fg})   # x (B, M, *S), fg (B, *S)
    out["loss"].backward()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from torch import nn

from medtune.errors import ConfigError
from medtune.pretrain.frequency import FILTER_KINDS
from medtune.registry import Registry


def check_one_of(key: str, value: object, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"objective.{key} must be one of {tuple(allowed)}, got {value!r}")


def check_mask_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"objective.mask_ratio must be in [0, 1), got {ratio}")


@dataclass
class ObjectiveConfig:
    """What every objective's config has: its name, which picks the config class."""

    # registry name of the objective: fremae, mae, simmim or mfm (see OBJECTIVES)
    name: str = "fremae"

    # ``name`` picks the config class when a section is loaded (medtune.config.from_dict)
    variant_key: ClassVar[str] = "name"

    @classmethod
    def variant_classes(cls) -> dict[str, type[ObjectiveConfig]]:
        """``{objective name: its config class}``, from :data:`OBJECTIVES`."""
        return {name: OBJECTIVES.get(name).config_class for name in OBJECTIVES}


@dataclass
class FreMAEConfig(ObjectiveConfig):
    """FreMAE (FreMIM, WACV 2024): masked input, frequency-band targets, multi-stage decoder."""

    name: str = "fremae"
    # fraction masked: of each sample's foreground pixels (pixel mode) or of the patches
    # (patch mode)
    mask_ratio: float = 0.25
    # "pixel": per-pixel foreground masking with a learnable per-modality token (the
    # paper); "patch": MAE-style, mask whole patches and encode only the visible tokens
    # (ViT backbones only)
    mask_mode: str = "pixel"
    # pixel masking. "sample": each sample loses mask_ratio of its own foreground (every
    # slice equally masked); "batch": mask_ratio of the batch's foreground pixels, drawn
    # over the whole batch (official code)
    mask_scope: str = "sample"
    # pixel masking. Value the learnable per-modality mask token starts at: 0 (the
    # z-scored mean) or 1 (official code)
    mask_token_init: float = 0.0
    # pixel masking. Masked inputs are scaled by U(1-j, 1+j) and shifted by U(-j, j); 0 disables
    jitter: float = 0.1
    # pixel masking. "sample": one jitter draw per (sample, modality); "column": one per
    # (sample, modality, image column), the official code's B x M x 1 x W draw
    jitter_shape: str = "sample"
    # half-width, in frequency bins, of the central low-band square (or circle radius)
    radius: float = 10.0
    # band shape: "square" (symmetric, 2r + 1 bins per axis), "square_official" (FreMIM's
    # 2r-bin slice [n//2 - r, n//2 + r)) or "circle" (see medtune.pretrain.frequency)
    filter_kind: str = "square"
    # the low band is taken from the image average-pooled by this factor (128 -> 32);
    # the bottom-up head predicts at that size
    low_pool: int = 4
    # weight of the high-band loss in the total
    high_weight: float = 1.0
    # weight of the low-band loss in the total
    low_weight: float = 1.3
    # "frequency": focal frequency loss on the bands (the paper); "pixel": MSE in image
    # space on the same predictions (for comparisons)
    loss: str = "frequency"
    # exponent of the focal frequency weight log(1 + d^alpha)
    focal_alpha: float = 1.0
    # loss "frequency". Standardise each band's target per (sample, modality): the band,
    # as an image, gets mean 0 and variance 1 (MAE's normalised pixels in the frequency
    # domain; not in FreMIM). false: the raw bands (the paper). See docs/fidelity.md
    target_norm: bool = False
    # "light": medtune's multi-stage decoder over the backbone's stages, any backbone;
    # "unetr": the official whole network, MONAI SwinUNETR's UNETR blocks (swinunetr
    # backbones only) feeding the frequency heads; its blocks are saved for finetuning
    decoder: str = "light"
    # "light": channels of both decoder paths; "unetr": channels of the low-band head
    # (official 32; the high-band head has the backbone's feature_size)
    decoder_width: int = 32
    # global filters with one transfer function per channel (official) or one shared by
    # all channels (far fewer parameters in 3D)
    filter_per_channel: bool = True
    # "light": a full-resolution conv block of the masked input feeds both heads (the
    # official network's encoder1); without it the high-band head sees only maps of
    # stride 4 and coarser and does not learn the high band. "unetr" always has it
    image_path: bool = True
    # "light" with image_path: the input path also starts the bottom-up (low-band) path,
    # as the official enc0; false: the low band is predicted from the encoder's stages
    # only (the input path feeds the high-band head alone), so the decoder's convs of the
    # masked input cannot solve the low band around the encoder
    image_path_low: bool = True
    # "light" with image_path: channels of the decoder's full-resolution maps (the input
    # path, the top-down path's last map, the high-band filter and head); null: decoder_width
    # (the arrangement the held-out and downstream results were measured with). Narrower
    # cuts most of a small backbone's step (see docs/fidelity.md)
    full_resolution_width: int | None = None

    def __post_init__(self) -> None:
        check_mask_ratio(self.mask_ratio)
        check_one_of("mask_mode", self.mask_mode, ("pixel", "patch"))
        check_one_of("mask_scope", self.mask_scope, ("sample", "batch"))
        check_one_of("jitter_shape", self.jitter_shape, ("sample", "column"))
        check_one_of("decoder", self.decoder, ("light", "unetr"))
        check_one_of("filter_kind", self.filter_kind, FILTER_KINDS)
        check_one_of("loss", self.loss, ("frequency", "pixel"))
        if self.target_norm and self.loss != "frequency":
            raise ValueError("objective.target_norm standardises the frequency bands: it needs loss 'frequency'")
        if self.radius is None or self.radius < 0:
            raise ValueError(f"objective.radius must be a number >= 0, got {self.radius}")
        if self.low_pool < 1 or self.decoder_width < 1:
            raise ValueError("objective.low_pool and decoder_width must be >= 1")
        if self.full_resolution_width is not None and self.full_resolution_width < 1:
            raise ValueError(f"objective.full_resolution_width must be >= 1 or null, got {self.full_resolution_width}")


@dataclass
class MAEConfig(ObjectiveConfig):
    """MAE (He et al., CVPR 2022) on a ViT: encode visible patches, MSE on masked ones."""

    name: str = "mae"
    # fraction of the patches masked
    mask_ratio: float = 0.75
    # width of the light transformer decoder
    decoder_dim: int = 128
    # transformer blocks of the decoder
    decoder_depth: int = 2
    # attention heads of the decoder blocks
    decoder_heads: int = 4
    # normalise each target patch by its own mean and std
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        check_mask_ratio(self.mask_ratio)


@dataclass
class SimMIMConfig(ObjectiveConfig):
    """SimMIM (Xie et al., CVPR 2022): mask token over masked patch embeddings, L1 on masked pixels."""

    name: str = "simmim"
    # fraction of the mask blocks masked per sample
    mask_ratio: float = 0.6
    # side, in pixels, of the square blocks masked together (32 in SimMIM); a multiple
    # of the patch-embedding stride
    mask_block: int = 32

    def __post_init__(self) -> None:
        check_mask_ratio(self.mask_ratio)
        if self.mask_block < 1:
            raise ValueError(f"objective.mask_block must be >= 1, got {self.mask_block}")


@dataclass
class MFMConfig(ObjectiveConfig):
    """MFM (Xie et al., ICLR 2023): remove a band of the spectrum, predict it back."""

    name: str = "mfm"
    # band radius in frequency bins; None: 16 at 224 px, scaled with the image side
    radius: float | None = None
    # band shape: "circle" (MFM: the low set is dx^2 + dy^2 < r^2), "square" or "square_official"
    filter_kind: str = "circle"
    # the band removed from the input and predicted: "low", "high", or "random" (one of
    # the two per sample, p = 0.5, as MFM)
    band: str = "random"
    # exponent of the frequency distance |F_pred - F_true|: 1 (official MFM), 2 (squared)
    loss_gamma: float = 1.0
    # multiply the distance by the focal frequency weight (official MFM: false)
    focal_weight: bool = False
    # exponent of the focal weight log(1 + d^alpha) (with focal_weight only)
    focal_alpha: float = 1.0

    def __post_init__(self) -> None:
        check_one_of("filter_kind", self.filter_kind, FILTER_KINDS)
        check_one_of("band", self.band, ("low", "high", "random"))
        if self.radius is not None and self.radius < 0:
            raise ValueError(f"objective.radius must be >= 0, got {self.radius}")
        if self.loss_gamma <= 0:
            raise ValueError(f"objective.loss_gamma must be > 0, got {self.loss_gamma}")


def build_fremae(cfg: FreMAEConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.fremae import FreMAE

    return FreMAE(backbone, cfg)


def build_mae(cfg: MAEConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.mae import MAE

    return MAE(
        backbone,
        mask_ratio=cfg.mask_ratio,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        norm_pix_loss=cfg.norm_pix_loss,
    )


def build_simmim(cfg: SimMIMConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.simmim import SimMIM

    return SimMIM(backbone, mask_ratio=cfg.mask_ratio, mask_block=cfg.mask_block)


def build_mfm(cfg: MFMConfig, backbone: nn.Module) -> nn.Module:
    from medtune.pretrain.mfm import MFM

    return MFM(
        backbone, radius=cfg.radius, filter_kind=cfg.filter_kind, band=cfg.band,
        loss_gamma=cfg.loss_gamma, focal_weight=cfg.focal_weight, focal_alpha=cfg.focal_alpha,
    )


@dataclass(frozen=True)
class Objective:
    """A registered objective: its config class and what builds it around a backbone."""

    config_class: type[ObjectiveConfig]
    build: Callable[[ObjectiveConfig, nn.Module], nn.Module]


OBJECTIVES: Registry[Objective] = Registry("objective")
OBJECTIVES.register("fremae")(Objective(FreMAEConfig, build_fremae))
OBJECTIVES.register("mae")(Objective(MAEConfig, build_mae))
OBJECTIVES.register("simmim")(Objective(SimMIMConfig, build_simmim))
OBJECTIVES.register("mfm")(Objective(MFMConfig, build_mfm))


def build_objective(cfg: ObjectiveConfig, backbone: nn.Module) -> nn.Module:
    """The objective ``cfg.name`` around ``backbone`` (a :class:`medtune.models.Backbone`)."""
    objective = OBJECTIVES.get(cfg.name)
    if not isinstance(cfg, objective.config_class):
        raise ConfigError(
            f"objective '{cfg.name}' needs a {objective.config_class.__name__}, got {type(cfg).__name__}"
        )
    return objective.build(cfg, backbone)


__all__ = [
    "ObjectiveConfig",
    "FreMAEConfig",
    "MAEConfig",
    "SimMIMConfig",
    "MFMConfig",
    "Objective",
    "OBJECTIVES",
    "build_objective",
]
