"""Dynamic per-slice inference (task ``dynamic``): Med-DANet (V1) and Med-DANet V2.

A Decision Network looks at each slice and picks how to segment it: skip it (an empty
prediction, no cost), a crop path (a Crop Position Network places a fixed-size crop;
its prediction is pasted back) or the whole slice (V2, with weight bits picked per
encoder stage), or one model of a bank of segmenters (V1). The segmenter is the official
residual U-Net or any medtune 2D backbone with a decoder (``model.segmenter``).

    medtune finetune --task dynamic --config configs/meddanet_v2_brats.yaml --data DATA
    medtune predict --model RUN --input CASES --output PREDICTIONS   # + <case>.dynamic.json FLOPs reports

Layout: ``config.py`` (:class:`DynamicConfig`), ``layers.py`` (Gumbel straight-through,
weight quantization, crop and paste, bit selectors), ``model.py``
(:class:`DynamicSegmenter`, the three training phases, the counted cost table),
``segmenters.py`` (the residual U-Net or a backbone + decoder on the paths),
``inference.py`` (slices and volumes, FLOPs per slice), ``predict.py`` (``medtune
predict``, reports, validation), ``task.py`` (the task).
"""

from medtune.finetune.dynamic.config import DynamicConfig, DynamicModelConfig
from medtune.finetune.dynamic.inference import predict_slices, predict_volume
from medtune.finetune.dynamic.model import DynamicSegmenter
from medtune.finetune.dynamic.segmenters import BackbonePathSegmenter, UNetPathSegmenter

__all__ = ["BackbonePathSegmenter", "DynamicConfig", "DynamicModelConfig", "DynamicSegmenter", "UNetPathSegmenter",
           "predict_slices", "predict_volume"]
