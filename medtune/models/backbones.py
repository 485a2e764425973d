"""Backbones: timm 2D networks and MONAI's Swin encoder behind one stage API.

A backbone turns an image into a pyramid of feature maps, one per stage::

    backbone = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", img_size=64,
                                              options={"depth": 4}))
    stages = backbone.forward_stages(x)   # x (B, C, H, W)
    # stages[i]: (B, backbone.feature_channels[i], H / s_i, W / s_i), s_i = feature_strides[i]

Names pick a builder from :data:`BACKBONES` (timm-style): ``vit_*``/``deit*`` (timm
VisionTransformer, four evenly spaced blocks), ``swin_*`` (timm Swin, four stages),
``convnext_*`` (timm ConvNeXt, four stages), ``timm:<any timm name>`` (any timm model with
``forward_intermediates``), and ``swinunetr`` (the Swin encoder of MONAI's SwinUNETR, 2D
or 3D, five stages; the official FreMAE backbone). The wrapped network is ``.model``;
``state_dict()`` keys are therefore ``model.<timm or MONAI key>``, which is exactly what a
run folder's ``backbone.safetensors`` holds. Local pretrained weights are loaded by
:func:`medtune.models.weights.load_pretrained`; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from medtune.config import from_dict
from medtune.errors import ConfigError, DataError
from medtune.registry import Registry

log = logging.getLogger(__name__)

BACKBONES: Registry[Callable[["BackboneConfig"], "Backbone"]] = Registry("backbone")


@dataclass
class BackboneConfig:
    """Which backbone to build and how.

    Attributes:
        name: registry name: ``swinunetr``, ``vit_*``, ``deit*``, ``swin_*``,
            ``convnext_*`` or ``timm:<timm model name>``.
        in_chans: input channels, i.e. the number of modalities (4 for BraTS).
        img_size: side of the (square or cubic) input the network is built for. ViT
            and Swin need it at creation (position embeddings, attention masks); every
            backbone checks that it is a multiple of its deepest stride.
        spatial_dims: 2 for slices ``(B, C, H, W)``; 3 for volumes ``(B, C, H, W, D)``,
            which only MONAI networks (``swinunetr``) support.
        pretrained: a local weight file or run folder to initialise from; never
            downloaded. See :func:`medtune.models.weights.load_pretrained`.
        options: extra builder arguments. timm backbones pass them to
            ``timm.create_model`` (``depth``, ``window_size``, ``drop_path_rate``,
            ``dynamic_img_size`` ...), except ``out_indices`` (which blocks/stages become
            feature stages). ``swinunetr`` takes the fields of :class:`SwinUNETROptions`.

    Sizes: every backbone needs ``img_size`` to be a multiple of its deepest stride (ViT:
    the patch size; Swin, ConvNeXt, swinunetr: 32) so that stage ``i`` is exactly
    ``img_size / feature_strides[i]``. timm >= 1.0 pads Swin windows and shrinks them on
    small maps, so ``window_size`` need not divide the feature maps.
    """

    name: str = "swinunetr"
    in_chans: int = 4
    img_size: int = 128
    spatial_dims: int = 2
    pretrained: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"backbone.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.in_chans < 1:
            raise ConfigError(f"backbone.in_chans must be >= 1, got {self.in_chans}")
        if self.img_size < 1:
            raise ConfigError(f"backbone.img_size must be >= 1, got {self.img_size}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"backbone.options must be a mapping, got {self.options!r}")


class Backbone(nn.Module):
    """A wrapped timm/MONAI network that returns one feature map per stage.

    Attributes:
        model: the wrapped timm or MONAI module (adapters and MAE-style code reach in).
        family: ``"vit"``, ``"swin"``, ``"convnext"``, ``"monai_swin"`` or ``"timm"``.
        spatial_dims: 2 or 3.
        in_chans: input channels.
        img_size: the input side the network was built for, or None if any multiple of
            the deepest stride works.
        feature_channels: channels of each stage.
        feature_strides: downsampling of each stage with respect to the input.
        config: the :class:`BackboneConfig` it was built from (None if built by hand).
    """

    family: str = "timm"
    # state-dict key of the first conv's weight (adapted to N channels when loading RGB weights)
    stem_weight_key: str | None = None

    def __init__(
        self,
        model: nn.Module,
        *,
        spatial_dims: int,
        in_chans: int,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        img_size: int | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.feature_strides = tuple(int(s) for s in feature_strides)
        self.img_size = img_size
        self.config: BackboneConfig | None = None

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, in_chans, *S) -> [(B, feature_channels[i], *S / feature_strides[i]), ...]."""
        self.check_input(x)
        return self.extract_stages(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_stages(x)

    def extract_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names (ours, ``model.<...>``) timm exempts from weight decay."""
        names = getattr(self.model, "no_weight_decay", None)
        return {f"model.{name}" for name in names()} if callable(names) else set()

    def layer_ids(self) -> dict[str, int]:
        """Depth of each parameter, for layer-wise learning-rate decay: our names
        (``model.<...>``) -> 0 (the stem) ... K (the last layer). timm networks group
        their parameters with their own ``group_matcher(coarse=False)`` (as timm's
        ``param_groups_layer_decay``: a ViT's final norm joins its last block; parameters
        no rule matches, such as inserted prompts, join the last layer)."""
        from timm.models import group_parameters

        matcher = getattr(self.model, "group_matcher", None)
        if not callable(matcher):
            raise ConfigError(f"{type(self.model).__name__} defines no layers (no timm group_matcher), "
                              "so optim.layer_decay cannot apply to it")
        ids = group_parameters(self.model, matcher(coarse=False), reverse=True)
        return {f"model.{name}": int(i) for name, i in ids.items()}

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse an input whose rank, channels or size would give wrong stage shapes."""
        expected_ndim = 2 + self.spatial_dims
        if x.ndim != expected_ndim or x.shape[1] != self.in_chans:
            layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, H, W, D)"
            raise DataError(
                f"backbone input has shape {tuple(x.shape)}; expected {layout} with "
                f"C={self.in_chans}"
            )
        spatial = tuple(x.shape[2:])
        if self.img_size is not None and any(s != self.img_size for s in spatial):
            raise DataError(
                f"backbone input has spatial size {spatial}; this backbone was built for "
                f"img_size={self.img_size} (set backbone.img_size, or "
                f"options.dynamic_img_size=true for ViT/Swin)"
            )
        deepest = max(self.feature_strides)
        if any(s % deepest for s in spatial):
            raise DataError(
                f"backbone input has spatial size {spatial}; each side must be a multiple "
                f"of the deepest stride {deepest}"
            )


def backbone_family(backbone: Backbone) -> str:
    """``"vit"``, ``"swin"``, ``"convnext"``, ``"monai_swin"`` (or ``"timm"`` for others)."""
    return backbone.family


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone ``cfg.name`` and load ``cfg.pretrained`` (a local path) if set."""
    build = BACKBONES.get(cfg.name)
    backbone = build(cfg)
    backbone.config = cfg
    if cfg.pretrained:
        from medtune.models.weights import load_pretrained

        load_pretrained(backbone, cfg.pretrained)
    return backbone


def _check_img_size(cfg: BackboneConfig, deepest_stride: int) -> None:
    if cfg.img_size % deepest_stride:
        raise ConfigError(
            f"backbone '{cfg.name}': img_size {cfg.img_size} is not a multiple of its "
            f"deepest stride {deepest_stride}"
        )


# --------------------------------------------------------------------------- timm


def vit_stage_indices(num_blocks: int, num_stages: int = 4) -> tuple[int, ...]:
    """Last block of each of ``num_stages`` equal groups: 12 blocks -> (2, 5, 8, 11).

    (0-based; the papers' "blocks 3/6/9/12".)
    """
    if num_blocks < num_stages:
        raise ConfigError(f"a ViT with {num_blocks} blocks cannot give {num_stages} stages")
    return tuple(round(num_blocks * (i + 1) / num_stages) - 1 for i in range(num_stages))


def _timm_family(model: nn.Module) -> str:
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, ConvNeXt):
        return "convnext"
    return "timm"


def _create_timm_model(cfg: BackboneConfig, timm_name: str, options: dict) -> nn.Module:
    import timm

    if cfg.spatial_dims != 2:
        raise ConfigError(
            f"backbone '{cfg.name}' is a 2D timm network; spatial_dims must be 2 "
            f"(apply it slice-wise, or use 'swinunetr' for 3D)"
        )
    if not timm.is_model(timm_name):
        raise ConfigError(f"backbone '{cfg.name}': timm has no model '{timm_name}'")
    kwargs: dict[str, Any] = dict(
        pretrained=False, in_chans=cfg.in_chans, num_classes=0, img_size=cfg.img_size
    )
    kwargs.update(options)
    try:
        try:
            return timm.create_model(timm_name, **kwargs)
        except TypeError as exc:
            # ViT and Swin are built for one input size; ConvNeXt and CNNs take no img_size.
            if "img_size" in options or "img_size" not in str(exc):
                raise
            log.debug("timm model '%s' takes no img_size; built for any input size", timm_name)
            del kwargs["img_size"]
            return timm.create_model(timm_name, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"backbone '{cfg.name}': bad option for timm ({exc})") from None


class TimmBackbone(Backbone):
    """A timm network; stages come from its ``forward_intermediates`` in NCHW."""

    def __init__(self, model: nn.Module, cfg: BackboneConfig, indices: Sequence[int]) -> None:
        info = model.feature_info
        channels = [info[i]["num_chs"] for i in indices]
        strides = [info[i]["reduction"] for i in indices]
        fixed = "img_size" in _model_init_args(model) and not cfg.options.get(
            "dynamic_img_size", False
        )
        super().__init__(
            model,
            spatial_dims=2,
            in_chans=cfg.in_chans,
            feature_channels=channels,
            feature_strides=strides,
            img_size=cfg.img_size if fixed else None,
        )
        self.family = _timm_family(model)
        self.out_indices = tuple(int(i) for i in indices)
        first_conv = model.pretrained_cfg.get("first_conv")
        if isinstance(first_conv, (list, tuple)):  # a few timm models list several
            first_conv = first_conv[0]
        self.stem_weight_key = f"model.{first_conv}.weight" if first_conv else None

        # The network's final LayerNorm (ViT, Swin) is applied to the deepest stage when
        # that stage is the network's last block, as the official Med-Tuning/UperNet code
        # does; it also gives the trainable `norm.*` extras of PETL methods a gradient.
        final_norm = getattr(model, "norm", None)
        self.final_norm_on_last = (
            isinstance(final_norm, nn.LayerNorm) and self.out_indices[-1] == len(info) - 1
        )

    def extract_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = self.model.forward_intermediates(
            x, indices=list(self.out_indices), intermediates_only=True, stop_early=True
        )
        if self.final_norm_on_last:
            last = stages[-1].movedim(1, -1)  # (B, H, W, C): LayerNorm over channels
            stages[-1] = self.model.norm(last).movedim(-1, 1)
        return stages


class TimmViTBackbone(TimmBackbone):
    """A timm VisionTransformer; every stage has stride ``patch_size`` and ``embed_dim`` channels.

    Attributes:
        num_blocks: transformer blocks in ``model.blocks``.
        embed_dim: token width.
        patch_size: patch side in pixels.
        out_indices: 0-based blocks whose outputs are the stages.
    """

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])


def _model_init_args(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).__init__).parameters)


def _build_timm(cfg: BackboneConfig, timm_name: str) -> TimmBackbone:
    options = dict(cfg.options)
    out_indices = options.pop("out_indices", None)
    model = _create_timm_model(cfg, timm_name, options)
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"backbone '{cfg.name}': timm model has no forward_intermediates")
    num_features = len(model.feature_info)
    family = _timm_family(model)
    if out_indices is None:
        indices = vit_stage_indices(num_features) if family == "vit" else range(num_features)
    else:
        indices = [int(i) for i in out_indices]
        bad = [i for i in indices if not -num_features <= i < num_features]
        if bad:
            raise ConfigError(
                f"backbone '{cfg.name}': options.out_indices {bad} out of range "
                f"(the model has {num_features} blocks/stages)"
            )
        indices = [i % num_features for i in indices]
    cls = TimmViTBackbone if family == "vit" else TimmBackbone
    backbone = cls(model, cfg, list(indices))
    _check_img_size(cfg, max(backbone.feature_strides))
    return backbone


@BACKBONES.register("vit_*")
@BACKBONES.register("deit*")
@BACKBONES.register("swin_*")
@BACKBONES.register("convnext_*")
def build_timm_backbone(cfg: BackboneConfig) -> TimmBackbone:
    """A timm ViT/DeiT/Swin/ConvNeXt named as in timm (e.g. ``vit_base_patch16_224``)."""
    return _build_timm(cfg, cfg.name)


@BACKBONES.register("timm:*")
def build_any_timm_backbone(cfg: BackboneConfig) -> TimmBackbone:
    """Any timm model with ``forward_intermediates``: ``timm:resnet18``."""
    return _build_timm(cfg, cfg.name.split(":", 1)[1])


# --------------------------------------------------------------------------- MONAI


@dataclass
class SwinUNETROptions:
    """Options of the ``swinunetr`` backbone (MONAI's SwinUNETR encoder).

    Defaults are the official FreMAE backbone (feature_size 48, depths 2,2,2,2,
    heads 3,6,12,24, window 7).
    """

    feature_size: int = 48  # channels of the first stage; stage i has feature_size * 2**i
    depths: tuple[int, ...] = (2, 2, 2, 2)  # Swin blocks in each of the four layers
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads in each layer
    window_size: int = 7  # attention window side (same along every axis)
    patch_size: int = 2  # patch embedding stride; inputs must be multiples of patch_size * 16
    mlp_ratio: float = 4.0  # MLP hidden width / token width
    qkv_bias: bool = True  # bias in the qkv projection
    drop_rate: float = 0.0  # dropout after the patch embedding
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    normalize: bool = True  # layer-normalise every returned stage (as SwinUNETR does)
    use_checkpoint: bool = False  # activation checkpointing (less memory, more compute)
    use_v2: bool = False  # SwinUNETR-V2: a residual conv block before each layer
    downsample: str = "merging"  # patch merging: "merging" or "mergingv2"

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError(
                f"swinunetr has 4 layers: options.depths {self.depths} and options.num_heads "
                f"{self.num_heads} need 4 entries each"
            )
        for i, heads in enumerate(self.num_heads):
            if (self.feature_size * 2**i) % heads:
                raise ConfigError(
                    f"swinunetr: layer {i} width {self.feature_size * 2**i} is not divisible "
                    f"by num_heads[{i}]={heads}"
                )


class MonaiSwinBackbone(Backbone):
    """The Swin encoder of MONAI's SwinUNETR (``swinViT``), 2D or 3D.

    Five stages: the patch embedding and the four Swin layers, strides
    ``patch_size * (1, 2, 4, 8, 16)``, channels ``feature_size * (1, 2, 4, 8, 16)``.
    """

    family = "monai_swin"
    stem_weight_key = "model.patch_embed.proj.weight"

    def __init__(self, model: nn.Module, cfg: BackboneConfig, options: SwinUNETROptions) -> None:
        super().__init__(
            model,
            spatial_dims=cfg.spatial_dims,
            in_chans=cfg.in_chans,
            feature_channels=[options.feature_size * 2**i for i in range(5)],
            feature_strides=[options.patch_size * 2**i for i in range(5)],
            img_size=None,
        )
        self.normalize = options.normalize

    def extract_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x, self.normalize)

    def layer_ids(self) -> dict[str, int]:
        """The patch embedding is layer 0, Swin layer ``k`` (``layers{k}``, and its
        ``layers{k}c`` convolution in SwinUNETR v2) is layer ``k``."""
        ids = {}
        for name, _ in self.model.named_parameters():
            match = re.match(r"layers(\d+)", name)
            ids[f"model.{name}"] = int(match.group(1)) if match else 0
        return ids


@BACKBONES.register("swinunetr")
def build_swinunetr_backbone(cfg: BackboneConfig) -> MonaiSwinBackbone:
    """MONAI SwinUNETR's Swin encoder with :class:`SwinUNETROptions` from ``cfg.options``."""
    from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
    from monai.utils import ensure_tuple_rep

    options = from_dict(SwinUNETROptions, cfg.options, "backbone.options")
    if options.downsample not in MERGING_MODE:
        raise ConfigError(
            f"swinunetr: options.downsample '{options.downsample}' is not one of "
            f"{', '.join(MERGING_MODE)}"
        )
    _check_img_size(cfg, options.patch_size * 16)
    dims = cfg.spatial_dims
    try:
        model = SwinTransformer(
            in_chans=cfg.in_chans,
            embed_dim=options.feature_size,
            window_size=ensure_tuple_rep(options.window_size, dims),
            patch_size=ensure_tuple_rep(options.patch_size, dims),
            depths=options.depths,
            num_heads=options.num_heads,
            mlp_ratio=options.mlp_ratio,
            qkv_bias=options.qkv_bias,
            drop_rate=options.drop_rate,
            attn_drop_rate=options.attn_drop_rate,
            drop_path_rate=options.drop_path_rate,
            use_checkpoint=options.use_checkpoint,
            spatial_dims=dims,
            downsample=MERGING_MODE[options.downsample],
            use_v2=options.use_v2,
        )
    except ValueError as exc:
        raise ConfigError(f"swinunetr: {exc}") from None
    return MonaiSwinBackbone(model, cfg, options)


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneConfig",
    "MonaiSwinBackbone",
    "SwinUNETROptions",
    "TimmBackbone",
    "TimmViTBackbone",
    "backbone_family",
    "build_any_timm_backbone",
    "build_swinunetr_backbone",
    "build_timm_backbone",
    "create_backbone",
    "vit_stage_indices",
]
