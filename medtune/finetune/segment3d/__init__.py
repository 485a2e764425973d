"""Whole-volume 3D segmentation networks trained from scratch (task ``segment3d``):
TransBTSV2, CGA U-Net, and MONAI's UNETR and SwinUNETR as baselines.

    medtune finetune --task segment3d --config configs/transbtsv2_brats.yaml --data DATA
    medtune predict --model RUN --input CASES --output PREDICTIONS

The task is the segmentation task with another model: a network from
:data:`medtune.models.networks.NETWORKS` (``model.network``) instead of a backbone,
adapter and decoder. Data building, validation (Dice per region, MONAI sliding
windows), NIfTI prediction and ``medtune evaluate`` are the segmentation task's,
imported, not copied.

Layout: ``config.py`` (:class:`Segment3DConfig`), ``model.py``
(:class:`NetworkSegmenter`), ``task.py`` (the task).
"""

from medtune.finetune.segment3d.config import Segment3DConfig
from medtune.finetune.segment3d.model import NetworkSegmenter, build_network_segmenter

__all__ = ["NetworkSegmenter", "Segment3DConfig", "build_network_segmenter"]
