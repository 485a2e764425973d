"""Referring image segmentation on CLIP (CRIS-style), optionally with CM-MaskSD.

Layout: ``config.py`` (the run config), ``layers.py`` (fusion neck, pixel-word
decoder, dynamic-kernel projector), ``model.py`` (:class:`ReferringSegmenter`),
``cmmasksd.py`` (the masked self-distillation branches), ``metrics.py`` (oIoU, mIoU,
prec@X), ``evaluate.py`` (evaluation split over processes), ``overhead.py`` (what
CM-MaskSD costs), ``predict.py`` (``medtune predict``), ``task.py`` (the task).
"""

from medtune.finetune.referring.cmmasksd import CMMaskSD, CMMaskSDConfig
from medtune.finetune.referring.config import (
    ReferringConfig,
    ReferringDataConfig,
    ReferringEvalConfig,
    ReferringModelConfig,
)
from medtune.finetune.referring.model import ReferringSegmenter, build_referring_model

__all__ = [
    "CMMaskSD", "CMMaskSDConfig", "ReferringConfig", "ReferringDataConfig", "ReferringEvalConfig",
    "ReferringModelConfig", "ReferringSegmenter", "build_referring_model",
]
