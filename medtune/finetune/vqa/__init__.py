"""MF2-MVQA: medical visual question answering with stage-wise vision-question fusion.

Layout: ``config.py`` (the run config), ``model.py`` (:class:`VQAModel`, the fusions),
``data.py`` (records, datasets, answer vocabulary), ``evaluate.py`` (accuracy,
evaluation split over processes), ``predict.py`` (``medtune predict``), ``task.py`` (the task).
"""

from medtune.finetune.vqa.config import VQAConfig, VQADataConfig, VQAModelConfig
from medtune.finetune.vqa.model import VQAModel, build_vqa_model

__all__ = ["VQAConfig", "VQADataConfig", "VQAModel", "VQAModelConfig", "build_vqa_model"]
