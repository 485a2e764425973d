"""Whole segmentation networks for volumes, made by name: TransBTSV2, CGA U-Net, MONAI's
UNETR and SwinUNETR.

Unlike a backbone + decoder (the slice-wise segmenter), these are trained from scratch as
one network on 3D crops. Each is a :class:`SegmentationNetwork`::

    net = create_network(NetworkConfig(network="transbtsv2"), num_classes=4, img_size=(128, 128, 128))
    logits = net(x)                     # x (B, M, H, W, D) of any size -> (B, K, H, W, D)
    out = net.forward_outputs(x_padded) # {"logits", "embedding", ...auxiliary outputs}

Sizes: a network downsamples by ``size_divisor`` (its output stride); :meth:`forward`
zero-pads each spatial side up to a multiple of it (at the far end, where zero is the
z-scored background) and crops the logits back, so odd crops work. Networks built for one
input size (UNETR's position embeddings) refuse another, naming both sizes.

The loss hook: ``forward_outputs`` returns, besides the logits, what the network's own
losses read (CGA U-Net's coarse class map and class centres), and the class attribute
``auxiliary_losses`` names those loss terms (:data:`medtune.models.losses.LOSSES`) with
their default weights; the segmenter weights them with the configured terms, so no
training loop knows about any network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import from_dict
from medtune.errors import ConfigError, DataError
from medtune.registry import Registry

NETWORKS: Registry[Callable[..., "SegmentationNetwork"]] = Registry("network")


@dataclass
class NetworkConfig:
    """The ``model:`` section of a ``segment3d`` run: which network, and its options."""

    network: str = "transbtsv2"  # registry name: transbtsv2, cga_unet, unetr, swinunetr
    in_chans: int = 4  # input channels (modalities)
    options: dict = field(default_factory=dict)  # the network's own options (its Options dataclass)

    def __post_init__(self) -> None:
        if self.in_chans < 1:
            raise ValueError(f"model.in_chans must be >= 1, got {self.in_chans}")
        if not isinstance(self.options, dict):
            raise ValueError(f"model.options must be a mapping, got {self.options!r}")


class SegmentationNetwork(nn.Module):
    """A whole network: ``(B, in_chans, *S) -> (B, num_classes, *S)`` logits.

    Subclasses set the attributes and implement :meth:`forward_outputs`.

    Attributes:
        in_chans, num_classes, spatial_dims: input channels, classes, 3.
        size_divisor: inputs are padded to multiples of it (the output stride).
        fixed_size: the one (padded) input size the network accepts, or None.
        embedding_channels: channels of ``forward_outputs(x)["embedding"]`` (the last
            decoder map, at the input size), or None when there is none.
        outputs: the keys :meth:`forward_outputs` returns.
        auxiliary_losses: loss terms the network needs beyond the configured ones,
            ``{LOSSES name: default weight}`` (the configured ``loss:`` section may
            change a weight, 0 turns a term off).
    """

    outputs: ClassVar[tuple[str, ...]] = ("logits", "embedding")
    auxiliary_losses: ClassVar[Mapping[str, float]] = {}

    def __init__(self, in_chans: int, num_classes: int, size_divisor: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.size_divisor = size_divisor
        self.spatial_dims = spatial_dims
        self.fixed_size: tuple[int, ...] | None = None
        self.embedding_channels: int | None = None

    def padded_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Each side rounded up to a multiple of :attr:`size_divisor`."""
        return round_up(size, self.size_divisor)

    def pad(self, x: torch.Tensor, value: float = 0) -> torch.Tensor:
        """Pad the spatial axes of ``(B, C, *S)`` (or labels ``(B, *S)``) at their far ends
        up to :meth:`padded_size`."""
        spatial = x.shape[-self.spatial_dims:]
        target = self.padded_size(spatial)
        if tuple(spatial) == target:
            return x
        widths = [w for s, t in zip(reversed(spatial), reversed(target)) for w in (0, t - s)]
        return F.pad(x, widths, value=value)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_chans:
            raise DataError(
                f"{type(self).__name__} input has shape {tuple(x.shape)}; expected (B, {self.in_chans}, H, W, D)"
            )
        padded = self.padded_size(x.shape[2:])
        if self.fixed_size is not None and padded != self.fixed_size:
            raise DataError(
                f"{type(self).__name__} was built for inputs of {list(self.fixed_size)} voxels; got "
                f"{list(x.shape[2:])} (train and predict with the crop size it was built for)"
            )

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x (B, in_chans, *S)``, sides multiples of ``size_divisor`` -> ``{"logits": (B, K, *S),
        "embedding": (B, embedding_channels, *S), ...auxiliary outputs}``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, *S)`` of any-sized ``x (B, in_chans, *S)`` (padded, then cropped back)."""
        self.check_input(x)
        logits = self.forward_outputs(self.pad(x))["logits"]
        return logits[(..., *(slice(0, s) for s in x.shape[2:]))]


def round_up(size: Sequence[int], divisor: int) -> tuple[int, ...]:
    """Each side of ``size`` rounded up to a multiple of ``divisor``."""
    return tuple(-(-int(s) // divisor) * divisor for s in size)


def create_network(cfg: NetworkConfig, num_classes: int, img_size: Sequence[int]) -> SegmentationNetwork:
    """The network ``cfg.network`` for ``num_classes`` classes and training crops of
    ``img_size`` voxels (only networks with a fixed input size use it)."""
    build = NETWORKS.get(cfg.network)
    return build(cfg.in_chans, num_classes, tuple(int(s) for s in img_size), dict(cfg.options))


def network_options(cls: type, options: Mapping[str, Any]) -> Any:
    """``options`` as the network's options dataclass (unknown keys name ``model.options.<key>``)."""
    return from_dict(cls, dict(options), "model.options")


# --------------------------------------------------------------------------- MONAI baselines


class MonaiNetwork(SegmentationNetwork):
    """MONAI's UNETR or SwinUNETR as a :class:`SegmentationNetwork`; the embedding is the
    input of its output block (the last decoder map)."""

    def __init__(self, model: nn.Module, in_chans: int, num_classes: int, size_divisor: int,
                 embedding_channels: int, fixed_size: tuple[int, ...] | None = None) -> None:
        super().__init__(in_chans, num_classes, size_divisor)
        self.model = model
        self.fixed_size = fixed_size
        self.embedding_channels = embedding_channels

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.model.out.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return {"logits": logits, "embedding": captured[0]}


@dataclass
class UNETROptions:
    """MONAI ``UNETR`` options (its defaults: ViT-B, 16^3 patches)."""

    feature_size: int = 16  # width of the convolutional decoder's first level
    hidden_size: int = 768  # ViT width
    mlp_dim: int = 3072  # ViT MLP width
    num_heads: int = 12  # attention heads
    norm_name: str = "instance"  # decoder normalisation
    dropout_rate: float = 0.0


@NETWORKS.register("unetr")
def build_unetr(in_chans: int, num_classes: int, img_size: tuple[int, ...], options: Mapping) -> MonaiNetwork:
    """MONAI UNETR (Hatamizadeh et al. 2022), built for the padded crop size."""
    from monai.networks.nets import UNETR

    opts = network_options(UNETROptions, options)
    size = round_up(img_size, 16)
    try:
        model = UNETR(in_chans, num_classes, size, feature_size=opts.feature_size, hidden_size=opts.hidden_size,
                      mlp_dim=opts.mlp_dim, num_heads=opts.num_heads, norm_name=opts.norm_name,
                      dropout_rate=opts.dropout_rate)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"unetr: {exc}") from None
    return MonaiNetwork(model, in_chans, num_classes, 16, opts.feature_size, fixed_size=size)


@dataclass
class SwinUNETRNetworkOptions:
    """MONAI ``SwinUNETR`` options (the whole network; BraTS recipe widths by default)."""

    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    norm_name: str = "instance"
    drop_rate: float = 0.0
    use_checkpoint: bool = False
    use_v2: bool = False


@NETWORKS.register("swinunetr")
def build_swinunetr(in_chans: int, num_classes: int, img_size: tuple[int, ...], options: Mapping) -> MonaiNetwork:
    """MONAI SwinUNETR (Hatamizadeh et al. 2022): any input whose sides are multiples of 32."""
    from monai.networks.nets import SwinUNETR

    opts = network_options(SwinUNETRNetworkOptions, options)
    padded = round_up(img_size, 32)
    if all(side < 64 for side in padded):  # its instance norms need more than one voxel at stride 32
        raise ConfigError(f"swinunetr: crop size {list(img_size)} is too small; one side must be at least 64 voxels")
    try:
        model = SwinUNETR(in_chans, num_classes, feature_size=opts.feature_size, depths=opts.depths,
                          num_heads=opts.num_heads, window_size=opts.window_size, norm_name=opts.norm_name,
                          drop_rate=opts.drop_rate, use_checkpoint=opts.use_checkpoint, use_v2=opts.use_v2)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"swinunetr: {exc}") from None
    return MonaiNetwork(model, in_chans, num_classes, 32, opts.feature_size)


NETWORKS.register_path("transbtsv2", "medtune.models.transbtsv2:build_transbtsv2")
NETWORKS.register_path("cga_unet", "medtune.models.cga_unet:build_cga_unet")


__all__ = [
    "MonaiNetwork", "NETWORKS", "NetworkConfig", "SegmentationNetwork", "SwinUNETRNetworkOptions", "UNETROptions",
    "build_swinunetr", "build_unetr", "create_network", "network_options", "round_up",
]
