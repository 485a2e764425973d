"""The config of a ``dynamic`` run (Med-DANet V1 / V2: per-slice dynamic inference).

::

    task: dynamic
    data:    {root: ..., mode: 2d, img_size: 128, val_fraction: 0.2}   # training slices
    model:
      form: v2                   # v2: skip / crop / whole slice, stage-wise bits; v1: skip + a model bank
      segmenter: resunet         # resunet (official) or backbone: any medtune backbone + decoder (below)
      widths: [16]               # resunet: v2: the segmenter's width; v1: one segmenter per width (the bank)
      # segmenter: backbone: one backbone section per segmenter (v2: one; v1: the bank), as the
      # segmentation task's backbone: minus in_chans / img_size / spatial_dims (the run's)
      backbones: [{name: vit_tiny_patch16_224, pretrained: RUN, options: {dynamic_img_size: true}}]
      decoder: auto              # segmenter: backbone: upernet, unet, agln, unetr, multistage or auto
      adapter: {method: full}    # segmenter: backbone: the tuning method (full, lora, adaptformer, vpt ...)
      crop_size: 96              # v2: side of the crop path's crop (px), at most data.img_size
      bits: [8, 16]              # v2: weight bit widths the stage selectors pick from ([]: no quantization)
      decision: shufflenet_v2_x0_5   # the Decision Network (torchvision's ShuffleNetV2 0.5x, or a timm name)
      locator: shufflenet_v2_x0_5    # the Crop Position Network
      phases: [150, 150, 50]     # relative lengths of the phases: segmenter(s); + bits; decision only
      bits_cost: 0.1             # weight of the relative-FLOPs term in phase 2
      decision_cost: 1.0         # weight of the expected relative FLOPs in phase 3
      decision_lr_scale: 10.0    # the Decision Network trains at 10x the lr, its schedule restarted in phase 3
      slice_fit: pad             # prediction: slices of another size are padded (or resized) to fit
    loss: {dice_ce: 1.0}
    train: {...}

Costs are FLOPs counted with ``torch.utils.flop_counter`` at the training slice size,
relative to the whole-slice path in full precision; a stage at ``k`` bits costs
``k / 32`` of its counted FLOPs (the paper's cost model, not a measured time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from medtune.data.config import DataConfig
from medtune.finetune.segmentation.config import ValidationConfig
from medtune.trainer import TrainConfig

FORMS = ("v1", "v2")
SLICE_FITS = ("pad", "resize")
SEGMENTERS = ("resunet", "backbone")
RUN_BACKBONE_KEYS = ("in_chans", "img_size", "spatial_dims")  # set by the run, not the backbone section
DECISION_LOSSES = ("gumbel", "oracle")


def _default_data() -> DataConfig:
    return DataConfig(mode="2d", img_size=128)


@dataclass
class DynamicModelConfig:
    """The dynamic segmenter: its paths, the networks that choose them, and the training phases."""

    form: str = "v2"  # "v2": skip / crop / whole slice with stage-wise bits; "v1": skip + a bank of widths
    # the 2D segmenter: "resunet" (the TransBTS-style residual U-Net, official) or "backbone"
    # (medtune backbone(s) + decoder: model.backbones, decoder, decoder_options, adapter)
    segmenter: str = "resunet"
    widths: list[int] = field(default_factory=lambda: [16])  # resunet width(s): v2 one, v1 one per bank model
    blocks: list[int] = field(default_factory=lambda: [1, 2, 2, 4])  # resunet: residual blocks per encoder stage
    norm: str = "batch"  # resunet: the normalisation (official: batch)
    # segmenter backbone: BackboneConfig sections (v2: one; v1: one per bank model), without
    # in_chans, img_size, spatial_dims (the run's in_chans, data.img_size, 2)
    backbones: list[dict] = field(default_factory=list)
    decoder: str = "auto"  # segmenter backbone: decoder name (auto: UperNet for a plain ViT, else U-Net)
    decoder_options: dict = field(default_factory=dict)  # segmenter backbone: the decoder's options
    adapter: dict = field(default_factory=lambda: {"method": "full"})  # segmenter backbone: the tuning method
    crop_size: int = 96  # v2: the crop path's crop side (px)
    bits: list[int] = field(default_factory=lambda: [8, 16])  # v2: weight bits per stage to pick from
    decision: str = "shufflenet_v2_x0_5"  # the Decision Network: torchvision ShuffleNetV2 0.5x or a timm model
    locator: str = "shufflenet_v2_x0_5"  # v2: the Crop Position Network (same choices)
    # weight of a smooth-L1 telling the Crop Position Network where the foreground is (0: official,
    # it learns only through the crop and paste)
    locator_loss: float = 1.0
    tau: float = 1.0  # Gumbel-softmax temperature of the decision
    phases: list[float] = field(default_factory=lambda: [150.0, 150.0, 50.0])  # relative lengths (official epochs)
    bits_cost: float = 0.1  # phase 2: weight of the paths' relative FLOPs at the selected bits
    decision_cost: float = 1.0  # phase 3: weight of the decided path's relative FLOPs
    # phase 3: "gumbel" (official: the Gumbel straight-through mixture's loss + cost) or "oracle"
    # (cross-entropy to each slice's cheapest good path: least per-slice CE + decision_cost x cost)
    decision_loss: str = "gumbel"
    decision_lr_scale: float = 10.0  # the Decision Network's lr x this, its schedule restarted in phase 3 (official)
    slice_fit: str = "pad"  # prediction on slices of another size: "pad" (zero, up) or "resize" (bilinear)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"model.form must be one of {', '.join(FORMS)}, got '{self.form}'")
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"model.segmenter must be one of {', '.join(SEGMENTERS)}, got '{self.segmenter}'")
        if self.segmenter == "resunet":
            if not self.widths or any(w < 1 for w in self.widths):
                raise ValueError(f"model.widths must list positive widths, got {self.widths}")
            if self.form == "v2" and len(self.widths) != 1:
                raise ValueError(f"model.form v2 has one segmenter: model.widths needs one width, got {self.widths}")
            if self.backbones:
                raise ValueError("model.backbones is for model.segmenter: backbone (this run's is resunet)")
        else:
            if not self.backbones:
                raise ValueError("model.segmenter backbone needs model.backbones: [{name: ...}, ...]")
            if self.form == "v2" and len(self.backbones) != 1:
                raise ValueError(f"model.form v2 has one segmenter: model.backbones needs one section, "
                                 f"got {len(self.backbones)}")
            if not isinstance(self.adapter, dict) or "method" not in self.adapter:
                raise ValueError("model.adapter must be a section with a 'method' key (full, lora, ...)")
        if any(b not in (2, 4, 8, 16) for b in self.bits):
            raise ValueError(f"model.bits must be among 2, 4, 8, 16, got {self.bits}")
        if self.form == "v1" and self.bits:
            raise ValueError("model.bits is V2's stage-wise quantization: set model.bits: [] for form v1")
        if len(self.phases) != 3 or any(p < 0 for p in self.phases) or sum(self.phases) <= 0:
            raise ValueError(f"model.phases needs 3 non-negative fractions, got {self.phases}")
        if self.slice_fit not in SLICE_FITS:
            raise ValueError(f"model.slice_fit must be one of {', '.join(SLICE_FITS)}, got '{self.slice_fit}'")
        if self.decision_loss not in DECISION_LOSSES:
            raise ValueError(f"model.decision_loss must be one of {', '.join(DECISION_LOSSES)}, got '{self.decision_loss}'")
        if self.tau <= 0:
            raise ValueError(f"model.tau must be > 0, got {self.tau}")

    @property
    def paths(self) -> tuple[str, ...]:
        """The choices of the Decision Network, in its output order (V1 with backbones:
        ``whole_<backbone name>``, numbered where a name repeats)."""
        if self.form == "v2":
            return ("skip", "crop", "whole")
        if self.segmenter == "resunet":
            return ("skip", *(f"whole_w{w}" for w in self.widths))
        names = [re.sub(r"[^A-Za-z0-9]+", "_", str(b.get("name", "backbone"))).strip("_") for b in self.backbones]
        return ("skip", *(f"whole_{n}" if names.count(n) == 1 else f"whole_{n}_{i}" for i, n in enumerate(names)))

    def backbone_configs(self, in_chans: int, img_size: int) -> list:
        """``model.backbones`` as :class:`~medtune.models.BackboneConfig` s for slices of
        ``img_size`` with ``in_chans`` channels (unknown keys name ``model.backbones[i].<key>``)."""
        from medtune.config import from_dict
        from medtune.errors import ConfigError
        from medtune.models.backbones import BackboneConfig

        configs = []
        for i, section in enumerate(self.backbones):
            where = f"model.backbones[{i}]"
            if not isinstance(section, dict):
                raise ConfigError(f"{where} must be a section ({{name: ..., ...}}), got {section!r}")
            given = [key for key in RUN_BACKBONE_KEYS if key in section]
            if given:
                raise ConfigError(f"{where}.{given[0]} is the run's (in_chans, data.img_size, 2D slices): remove it")
            configs.append(from_dict(BackboneConfig, {**section, "in_chans": in_chans, "img_size": img_size,
                                                      "spatial_dims": 2}, where))
        return configs


@dataclass
class DynamicConfig:
    """A ``dynamic`` run: training slices, the dynamic segmenter, loss, training, validation."""

    data: DataConfig = field(default_factory=_default_data)  # labeled volumes; mode must be 2d
    in_chans: int = 4  # input channels (modalities)
    model: DynamicModelConfig = field(default_factory=DynamicModelConfig)
    # loss terms by name, {name: weight | {weight, **options}}; see medtune.models.losses
    loss: dict = field(default_factory=lambda: {"dice_ce": 1.0})
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out evaluation

    def __post_init__(self) -> None:
        if self.data.mode != "2d":
            raise ValueError("dynamic inference trains on 2D slices: set data.mode: 2d")
        if self.model.form == "v2" and self.model.crop_size > self.data.img_size:
            raise ValueError(
                f"model.crop_size {self.model.crop_size} is larger than the slice (data.img_size "
                f"{self.data.img_size})"
            )
        if self.model.segmenter == "resunet":  # (a backbone segmenter's stride is checked when it is built)
            stride = 2 ** (len(self.model.blocks) - 1)
            for key, side in (("data.img_size", self.data.img_size), ("model.crop_size", self.model.crop_size)):
                if side % stride:
                    raise ValueError(f"{key} {side} must be a multiple of the segmenter's stride {stride}")
        else:
            self.model.backbone_configs(self.in_chans, self.data.img_size)  # unknown keys fail here

    @property
    def slice_size(self) -> tuple[int, int]:
        return (int(self.data.img_size),) * 2
