"""The config of a segmentation finetuning run (``medtune finetune``, task ``segmentation``).

::

    task: segmentation                             # picks the task; not a field of the config
    data:      {root: ..., mode: 3d, crop_size: [64, 64, 16], val_fraction: 0.2}
    backbone:  {name: vit_base_patch16_224, in_chans: 4, img_size: 64, pretrained: ...}
    adapter:   {method: med-tuning, ratio: 6}      # any registered adapter method
    model:     {decoder: auto, gradient_checkpointing: false}
    loss:      {dice_ce: 1.0}                      # or {dice_ce: 1.0, pne: 0.1}: medtune.models.losses
    train:     {max_steps: 1000, batch_size: 2, eval_every: 100, optim: {...}}
    validation: {overlap: 0.5, tta: false}
    self_distill: null                             # or a SelfDistillConfig section

Training samples are 3D crops ``data.crop_size = (h, w, T)``: ``h, w`` must be the
backbone's ``img_size`` for fixed-size backbones (ViT, Swin); ``T`` slices per crop are
what the adapters mix. Whole-volume inference slides a window of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medtune.data.config import DataConfig
from medtune.finetune.self_distill import SelfDistillConfig
from medtune.models.backbones import BackboneConfig
from medtune.trainer import TrainConfig


def _default_data() -> DataConfig:
    return DataConfig(mode="3d", crop_size=[128, 128, 16])


@dataclass
class SegmentationModelConfig:
    """Decoder and loss of the slice-wise segmenter."""

    # "upernet", "unet", "agln", "unetr" (MONAI SwinUNETR's decoder; swinunetr backbones, takes a
    # FreMAE 'unetr' run's blocks), "multistage" (FreMAE's light-decoder trunk with a full-resolution
    # path of the input, any backbone; takes a light FreMAE run's trunk: set its width to the run's
    # objective.decoder_width) or "auto" (UperNet for plain ViT, U-Net otherwise)
    decoder: str = "auto"
    decoder_options: dict = field(default_factory=dict)  # extra decoder kwargs (channels, norm, ...)
    lambda_dice: float = 1.0  # weight of the softmax Dice part of the dice_ce loss term
    lambda_ce: float = 1.0  # weight of its cross-entropy part
    dice_include_background: bool = False  # whether class 0 counts in its Dice part
    gradient_checkpointing: bool = False  # recompute backbone blocks in backward (less memory)


@dataclass
class ValidationConfig:
    """Whole-volume validation on held-out cases (every ``train.eval_every`` steps)."""

    overlap: float = 0.5  # sliding-window overlap between neighbouring windows (nnU-Net: 0.5)
    sw_batch_size: int = 1  # windows per forward
    tta: bool = False  # average over flips of every subset of the spatial axes
    mode: str = "gaussian"  # sliding-window blending: "gaussian" or "constant"
    best_metric: str = "Dice_mean"  # evaluation key whose maximum picks the best checkpoint
    max_cases: int | None = None  # validate on at most this many held-out cases (None: all)

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"validation.overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"validation.mode must be gaussian or constant, got '{self.mode}'")
        if self.sw_batch_size < 1:
            raise ValueError(f"validation.sw_batch_size must be >= 1, got {self.sw_batch_size}")


@dataclass
class SegmentationConfig:
    """A segmentation finetuning run: data, backbone, adapter, decoder, training, validation."""

    data: DataConfig = field(default_factory=_default_data)  # labeled volumes; mode must be 3d
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # the (frozen) 2D backbone
    # the tuning method: {"method": <registry name>, **its options}; see medtune.adapters
    adapter: dict = field(default_factory=lambda: {"method": "med-tuning"})
    model: SegmentationModelConfig = field(default_factory=SegmentationModelConfig)  # decoder + loss
    # loss terms by name, {name: weight | {weight, **options}}; see medtune.models.losses
    loss: dict = field(default_factory=lambda: {"dice_ce": 1.0})
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out evaluation
    self_distill: SelfDistillConfig | None = None  # masked self-distillation regulariser, off if null

    def __post_init__(self) -> None:
        if self.data.mode != "3d":
            raise ValueError("segmentation finetuning trains on 3D crops: set data.mode: 3d")
        if not isinstance(self.adapter, dict) or "method" not in self.adapter:
            raise ValueError("adapter must be a section with a 'method' key (e.g. med-tuning, lora)")

    @property
    def roi_size(self) -> tuple[int, int, int]:
        """Training crop = sliding-window size ``(h, w, T)``."""
        return tuple(int(s) for s in self.data.crop_size)  # type: ignore[return-value]
