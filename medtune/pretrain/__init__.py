"""Self-supervised pretraining: FreMAE and the MIM baselines (MAE, SimMIM, MFM).

Objectives are built from their own config class (:class:`FreMAEConfig`,
:class:`MAEConfig`, :class:`SimMIMConfig`, :class:`MFMConfig`, all
:class:`ObjectiveConfig`; a recipe's ``objective.name`` picks one)::

    from medtune.models import BackboneConfig, create_backbone
    from medtune.pretrain import FreMAEConfig, build_objective

    backbone = create_backbone(BackboneConfig(name="swinunetr", img_size=64))
    objective = build_objective(FreMAEConfig(), backbone)
    out = objective({"image": x, "foreground": fg})  # {"loss", "loss_high", "loss_low", "mask_ratio"}

The frequency math (spectra, band masks, focal frequency loss, global filter) is in
:mod:`medtune.pretrain.frequency`, the masking strategies in :mod:`medtune.pretrain.masking`.
"""

from medtune.pretrain.frequency import (
    GlobalFilter,
    band_mask,
    focal_frequency_loss,
    focal_weight,
    high_band,
    inverse_spectrum,
    low_band,
    spectrum,
)
from medtune.pretrain.masking import block_masking, pixel_masking, random_masking
from medtune.pretrain.objectives import (
    OBJECTIVES,
    FreMAEConfig,
    MAEConfig,
    MFMConfig,
    ObjectiveConfig,
    SimMIMConfig,
    build_objective,
)

__all__ = [
    "OBJECTIVES",
    "ObjectiveConfig",
    "FreMAEConfig",
    "MAEConfig",
    "SimMIMConfig",
    "MFMConfig",
    "build_objective",
    "GlobalFilter",
    "band_mask",
    "focal_frequency_loss",
    "focal_weight",
    "high_band",
    "inverse_spectrum",
    "low_band",
    "spectrum",
    "block_masking",
    "pixel_masking",
    "random_masking",
    "save_reconstruction",
]


def __getattr__(name: str):
    # The figure pulls in matplotlib; import it only when asked for.
    if name == "save_reconstruction":
        from medtune.pretrain.figure import save_reconstruction

        return save_reconstruction
    raise AttributeError(f"module 'medtune.pretrain' has no attribute {name!r}")
