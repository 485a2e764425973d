"""A whole-volume network and its loss terms, as a segmenter the task trains and predicts with.

:class:`NetworkSegmenter` wraps a :class:`medtune.models.networks.SegmentationNetwork`:
training pads the crop and its label (background) up to the network's output stride and
hands the network's outputs (logits, embedding, its auxiliary outputs) to the criterion
built from the run's ``loss:`` section plus the network's ``auxiliary_losses``;
``forward_logits`` (sliding-window inference) returns logits at the input size.
"""

from __future__ import annotations

import torch

from medtune.finetune.segmentation.model import VolumeSegmenter
from medtune.models.losses import Criterion, LossContext, build_criterion
from medtune.models.networks import SegmentationNetwork, create_network


class NetworkSegmenter(VolumeSegmenter):
    """``network`` + ``criterion``: ``forward(batch)`` -> ``{"loss", <each term>}``;
    ``forward_logits(volume (B, M, *S)) -> (B, K, *S)`` for any ``S``."""

    def __init__(self, network: SegmentationNetwork, criterion: Criterion) -> None:
        super().__init__()
        self.network = network
        self.criterion = criterion
        self.num_classes = network.num_classes

    @property
    def in_chans(self) -> int:
        return self.network.in_chans

    def forward_outputs(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network's outputs on ``volume`` padded to its output stride (not cropped back)."""
        self.network.check_input(volume)
        return self.network.forward_outputs(self.network.pad(volume))

    def forward_logits(self, volume: torch.Tensor) -> torch.Tensor:
        return self.network(volume)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        label = self.network.pad(batch["label"], value=0)  # padded voxels are background, as their zero image
        return self.criterion(self.forward_outputs(batch["image"]), label)


def build_network_segmenter(cfg, num_classes: int) -> NetworkSegmenter:
    """The network of ``cfg.model`` for crops of ``cfg.data.crop_size``, and its criterion
    (``cfg.loss`` + the network's ``auxiliary_losses``)."""
    network = create_network(cfg.model, num_classes, cfg.roi_size)
    context = LossContext(num_classes, network.spatial_dims, network.embedding_channels, network.outputs)
    criterion = build_criterion(cfg.loss, context, auxiliary=network.auxiliary_losses)
    return NetworkSegmenter(network, criterion)


__all__ = ["NetworkSegmenter", "build_network_segmenter"]
