"""Dynamic per-slice inference (task ``dynamic``): Med-DANet (V1) and Med-DANet V2.

A Decision Network looks at each slice and picks how to segment it: skip it (an empty
prediction, no cost), a crop path (a Crop Position Network places a fixed-size crop;
its prediction is pasted back) or the whole slice (V2, with weight bits picked per
encoder stage), or one model of a bank of segmenters of different widths (V1).

    medtune finetune --task dynamic --config configs/meddanet_v2_brats.yaml --data DATA
    medtune predict --model RUN --input CASES --output PREDICTIONS   # + <case>.dynamic.json FLOPs reports

Layout: ``config.py`` (:class:`DynamicConfig`), ``layers.py`` (Gumbel straight-through,
weight quantization, crop and paste, bit selectors), ``model.py``
(:class:`DynamicSegmenter`, the three training phases, the counted cost table),
``inference.py`` (slices and volumes, FLOPs per slice), ``predict.py`` (``medtune
predict``, reports, validation), ``task.py`` (the task).
"""

from medtune.finetune.dynamic.config import DynamicConfig, DynamicModelConfig
from medtune.finetune.dynamic.inference import predict_slices, predict_volume
from medtune.finetune.dynamic.model import DynamicSegmenter

__all__ = ["DynamicConfig", "DynamicModelConfig", "DynamicSegmenter", "predict_slices", "predict_volume"]
