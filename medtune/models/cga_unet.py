"""CGA U-Net (Category Guided Attention U-Net; Wu et al., "Category Guided Attention Network
for Brain Tumor Segmentation in MRI", 2022), read from its official code
(delugewalker/CGA-U-Net, ``models/Unet_Both.py`` and ``train_both.py``).

A 3D U-Net (GroupNorm, base width 16, pre-activation residual blocks ``(1, 2, 2, 4)`` per
encoder level, stride-2 convs between levels, output stride 8) plus:

- the Supervised Attention Module (SAM): three stride-2 3x3x3 convs (no norm, no
  activation) on the raw input give a coarse class map ``(B, K, *S/8)``, supervised
  by the MSE against the one-hot label downsampled (nearest) to 1/8 (loss term
  ``cga_sam``, official weight 20);
- the intra-class update at the bottleneck: every voxel is assigned the class of the
  SAM map's argmax (hard, one-hot), each class centre is the mean bottleneck feature of
  its voxels (``sum / (count + 1e-5)``: a class without voxels has centre 0, never NaN),
  and each voxel gets its class centre added;
- the inter-class loss on the class centres (term ``cga_inter_class``):
  ``D = sum_b sqrt(sum_ij |c_i - c_j|^2)`` over the batch, loss = ``10 log(100 / D + 1)``
  (the square root and the division are guarded so equal centres give a finite loss).

Both loss terms are registered in :data:`medtune.models.losses.LOSSES` and named in
:attr:`CGAUNet.auxiliary_losses` with their official weights; the configured ``loss:``
section can change them (0 switches one off; without ``cga_sam`` nothing trains the SAM,
whose map is used only through its argmax, and multi-process runs then need
``train.find_unused_parameters: true``). Differences from the official code,
on purpose: the network returns logits (not softmax) and uses the configured main loss
(default Dice + CE; official: softmax Dice over the three tumour classes); its stem
dropout is active in training only (official ``F.dropout3d`` also drops at inference);
the inter-class term counts from the first step (official: from epoch 20 on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.blocks import ResidualBlock, UpConcat, conv_layer
from medtune.models.losses import LossContext, LossTerm
from medtune.models.networks import SegmentationNetwork, network_options

OUTPUT_STRIDE = 8
CENTRE_EPS = 1e-5  # official: voxel count + 1e-5


@dataclass
class CGAUNetOptions:
    """Options of the ``cga_unet`` network (defaults: the official code's)."""

    base_channels: int = 16  # encoder widths base * (1, 2, 4, 8)
    encoder_blocks: tuple[int, ...] = (1, 2, 2, 4)  # residual blocks per encoder level
    attention_channels: int = 16  # width of the SAM's first two convs
    stem_dropout: float = 0.2  # channel dropout after the stem conv (training only)
    norm: str = "group"  # "group" (official: GroupNorm(8)), "batch" or "instance"

    def __post_init__(self) -> None:
        if len(self.encoder_blocks) != 4 or min(self.encoder_blocks) < 1:
            raise ValueError(f"encoder_blocks needs 4 counts >= 1, got {list(self.encoder_blocks)}")
        if self.base_channels < 1 or self.attention_channels < 1:
            raise ValueError("base_channels and attention_channels must be >= 1")


# --------------------------------------------------------------------------- the math


def class_centres(features: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Mean feature of each class: ``features (B, C, *S)``, ``assignment (B, K, *S)``
    (one-hot or soft) -> ``(B, K, C)``; a class without voxels gets 0."""
    summed = torch.einsum("bc...,bk...->bkc", features, assignment)
    count = assignment.flatten(2).sum(-1, keepdim=True)  # (B, K, 1)
    return summed / (count + CENTRE_EPS)


def intra_class_update(features: torch.Tensor, assignment: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each voxel plus its class centre: ``features + sum_k assignment_k * centres_k``."""
    return features + torch.einsum("bkc,bk...->bc...", centres, assignment)


def hard_assignment(class_map: torch.Tensor) -> torch.Tensor:
    """``(B, K, *S)`` scores -> one-hot ``(B, K, *S)`` of their argmax (no gradient)."""
    index = class_map.argmax(1)
    return F.one_hot(index, class_map.shape[1]).movedim(-1, 1).to(class_map.dtype)


def inter_class_distance(centres: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``D = sum_b sqrt(sum_ij |c_i - c_j|^2)`` of ``centres (B, K, C)`` (official: summed
    over the batch); the square root is taken of at least ``eps`` (finite gradient)."""
    squared = (centres[:, :, None] - centres[:, None]).pow(2).sum(-1)  # (B, K, K)
    return squared.sum((1, 2)).clamp_min(eps).sqrt().sum()


def inter_class_loss(distance: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``10 log(100 / D + 1)``: smaller the further apart the class centres are."""
    return 10 * torch.log(100 / distance.clamp_min(eps) + 1)


def downsampled_one_hot(label: torch.Tensor, num_classes: int, size: Sequence[int]) -> torch.Tensor:
    """Class indices ``(B, *S)`` -> one-hot ``(B, K, *size)``, resampled by nearest neighbour
    (the official target of the SAM map)."""
    small = F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return F.one_hot(small, num_classes).movedim(-1, 1).float()


# --------------------------------------------------------------------------- the network


class CGAUNet(SegmentationNetwork):
    """CGA U-Net: ``forward_outputs(x)`` -> ``{"logits", "embedding", "sam_logits" (B, K, *S/8),
    "class_centres" (B, K, 8 * base)}``."""

    outputs: ClassVar[tuple[str, ...]] = ("logits", "embedding", "sam_logits", "class_centres")
    auxiliary_losses: ClassVar[Mapping[str, float]] = {"cga_sam": 20.0, "cga_inter_class": 1.0}

    def __init__(self, in_chans: int, num_classes: int, opts: CGAUNetOptions) -> None:
        super().__init__(in_chans, num_classes, OUTPUT_STRIDE)
        dims, base, norm = 3, opts.base_channels, opts.norm
        conv = conv_layer(dims)
        widths = [base * 2**i for i in range(4)]
        self.stem = conv(in_chans, base, 3, padding=1)
        self.stem_dropout = nn.Dropout3d(opts.stem_dropout)
        levels = []
        for i in range(4):
            down = [conv(widths[i - 1], widths[i], 3, stride=2, padding=1)] if i > 0 else []
            levels.append(nn.Sequential(*down, *(ResidualBlock(dims, widths[i], norm) for _ in range(opts.encoder_blocks[i]))))
        self.encoder = nn.ModuleList(levels)
        hidden = opts.attention_channels
        self.attention = nn.Sequential(  # SAM: raw input -> coarse class map at 1/8
            conv(in_chans, hidden, 3, stride=2, padding=1),
            conv(hidden, hidden, 3, stride=2, padding=1),
            conv(hidden, num_classes, 3, stride=2, padding=1),
        )
        self.up = nn.ModuleList(UpConcat(dims, widths[i + 1], widths[i]) for i in range(3))
        self.decode = nn.ModuleList(ResidualBlock(dims, widths[i], norm) for i in range(3))
        self.classifier = conv(base, num_classes, 1)
        self.embedding_channels = base

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        sam_logits = self.attention(x)  # (B, K, *S/8)
        h = self.stem_dropout(self.stem(x))
        skips = []
        for i, level in enumerate(self.encoder):
            h = level(h)  # (B, base * 2**i, *S / 2**i)
            if i < 3:
                skips.append(h)
        assignment = hard_assignment(sam_logits.detach())  # (B, K, *S/8)
        centres = class_centres(h, assignment)  # (B, K, 8 base)
        h = intra_class_update(h, assignment, centres)
        for i in (2, 1, 0):
            h = self.decode[i](self.up[i](h, skips[i]))
        return {"logits": self.classifier(h), "embedding": h, "sam_logits": sam_logits, "class_centres": centres}


def build_cga_unet(in_chans: int, num_classes: int, img_size: Sequence[int], options: Mapping) -> CGAUNet:
    """``cga_unet`` in :data:`medtune.models.networks.NETWORKS` (any input size: padded to 8)."""
    return CGAUNet(in_chans, num_classes, network_options(CGAUNetOptions, options))


# --------------------------------------------------------------------------- its losses


@dataclass
class NoOptions:
    """A loss term without options."""


class SupervisedAttentionLoss(LossTerm):
    """``cga_sam``: MSE between the SAM's coarse class map and the one-hot label downsampled to its size."""

    options_class = NoOptions
    requires = ("sam_logits",)

    def __init__(self, context: LossContext, options: NoOptions) -> None:
        super().__init__()
        self.num_classes = context.num_classes

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        sam = outputs["sam_logits"]
        target = downsampled_one_hot(label, self.num_classes, sam.shape[2:])
        return F.mse_loss(sam.float(), target)


class InterClassLoss(LossTerm):
    """``cga_inter_class``: ``10 log(100 / D + 1)`` of the class centres' spread ``D`` (:func:`inter_class_distance`)."""

    options_class = NoOptions
    requires = ("class_centres",)

    def __init__(self, context: LossContext, options: NoOptions) -> None:
        super().__init__()

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return inter_class_loss(inter_class_distance(outputs["class_centres"].float()))


__all__ = [
    "CGAUNet", "CGAUNetOptions", "InterClassLoss", "SupervisedAttentionLoss", "build_cga_unet", "class_centres",
    "downsampled_one_hot", "hard_assignment", "inter_class_distance", "inter_class_loss", "intra_class_update",
]
