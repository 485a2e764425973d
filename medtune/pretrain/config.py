"""The pretraining run config: data, backbone, objective, training loop, outputs.

A YAML recipe (``configs/fremae_*.yaml``) holds the sections; ``--set a.b=value``
overrides any key; unknown keys are errors::

    cfg = load_pretrain_config("configs/fremae_swinunetr2d_brats.yaml", ["train.max_steps=5"])

The run folder's ``config.json`` is ``to_dict(cfg)``: ``from_dict(PretrainConfig, ...)``
rebuilds it, and its ``backbone`` section rebuilds the backbone whose weights are in
``backbone.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medtune.config import load_config
from medtune.data.config import DataConfig
from medtune.errors import ConfigError
from medtune.models import BackboneConfig
from medtune.pretrain.objectives import FreMAEConfig, ObjectiveConfig
from medtune.trainer import TrainConfig


@dataclass
class PretrainConfig:
    """A self-supervised pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    """Dataset folder, 2D slices or 3D crops and their size, cache, workers."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The encoder being pretrained (what ``backbone.safetensors`` holds)."""
    objective: ObjectiveConfig = field(default_factory=FreMAEConfig)
    """FreMAE, MAE, SimMIM or MFM: ``objective.name`` picks the config class
    (:class:`FreMAEConfig`, ``MAEConfig`` ...), whose fields are the section's only keys."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch, optimizer, schedule, precision, saving (see ``medtune.trainer``)."""
    figure: bool = True
    """Write ``reconstruction.png`` (inputs, masks, targets, predictions) at the end."""
    figure_samples: int = 4
    """How many samples (held-out ones when there are) the figure shows."""
    heldout_samples: int = 64
    """Samples (slices or crops, evenly spread) of the held-out cases on which the
    objective's losses are measured at each evaluation (``train.eval_every``) and at the
    end; FreMAE also reports each band's loss against a zero prediction
    (``eval/high_ratio``; near 1: the band is not learned) and with the encoder's stage maps
    zeroed (``eval/high_ratio_no_encoder``; as low as ``high_ratio``: the decoder learned the
    band without the encoder). The held-out cases are the
    finetuning validation split (``data.val_fraction``, by hashed case id) and
    pretraining does not train on them. 0: pretrain on every case, measure nothing."""

    def __post_init__(self) -> None:
        check_consistency(self)


def check_consistency(cfg: PretrainConfig) -> None:
    """Refuse sections that disagree (sizes, dimensions, channel counts), naming the keys."""
    data, backbone = cfg.data, cfg.backbone
    spatial_dims = 2 if data.mode == "2d" else 3
    if backbone.spatial_dims != spatial_dims:
        raise ConfigError(
            f"data.mode is {data.mode} but backbone.spatial_dims is {backbone.spatial_dims}"
        )
    if data.mode == "2d" and data.img_size != backbone.img_size:
        raise ConfigError(f"data.img_size {data.img_size} differs from backbone.img_size {backbone.img_size}")
    if data.mode == "3d" and any(size != backbone.img_size for size in data.crop_size):
        raise ConfigError(
            f"data.crop_size {list(data.crop_size)} must be a cube of backbone.img_size {backbone.img_size}"
        )
    if data.modalities is not None and len(data.modalities) != backbone.in_chans:
        raise ConfigError(
            f"data.modalities has {len(data.modalities)} names but backbone.in_chans is {backbone.in_chans}"
        )
    if cfg.figure_samples < 1:
        raise ConfigError(f"figure_samples must be >= 1, got {cfg.figure_samples}")
    if cfg.heldout_samples < 0:
        raise ConfigError(f"heldout_samples must be >= 0, got {cfg.heldout_samples}")


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a pretraining recipe, apply ``a.b=value`` overrides, check it."""
    return load_config(PretrainConfig, path, overrides)


__all__ = ["PretrainConfig", "check_consistency", "load_pretrain_config"]
