"""The config of a ``segment3d`` run: a whole 3D network trained from scratch.

::

    task: segment3d
    data:       {root: ..., mode: 3d, crop_size: [128, 128, 128], val_fraction: 0.2}
    model:      {network: transbtsv2, in_chans: 4, options: {embed_dim: 512, ...}}
    loss:       {dice_ce: 1.0}                      # + the network's own terms (CGA U-Net's)
    train:      {max_steps: ..., batch_size: 1, optim: {...}}
    validation: {overlap: 0.5, tta: false}

Training samples are 3D crops of ``data.crop_size``; whole-volume validation and
prediction slide a window of the same size (MONAI). A crop side that is not a multiple
of the network's output stride is zero-padded up to one inside the network (and the
logits cropped back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medtune.data.config import DataConfig
from medtune.finetune.segmentation.config import ValidationConfig
from medtune.models.networks import NetworkConfig
from medtune.trainer import TrainConfig


def _default_data() -> DataConfig:
    return DataConfig(mode="3d", crop_size=[128, 128, 128])


@dataclass
class Segment3DConfig:
    """A ``segment3d`` run: data, network, loss terms, training, validation."""

    data: DataConfig = field(default_factory=_default_data)  # labeled volumes; mode must be 3d
    model: NetworkConfig = field(default_factory=NetworkConfig)  # the network and its options
    # loss terms by name, {name: weight | {weight, **options}}; see medtune.models.losses
    loss: dict = field(default_factory=lambda: {"dice_ce": 1.0})
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out evaluation

    def __post_init__(self) -> None:
        if self.data.mode != "3d":
            raise ValueError("segment3d trains on 3D crops: set data.mode: 3d")

    @property
    def roi_size(self) -> tuple[int, int, int]:
        """Training crop = sliding-window size ``(h, w, d)``."""
        return tuple(int(s) for s in self.data.crop_size)  # type: ignore[return-value]
