"""The ``segment3d`` task: a whole 3D network (``model.network``) trained from scratch on
3D crops, validated and predicting with MONAI sliding windows.

    medtune finetune --task segment3d --config configs/transbtsv2_brats.yaml --data DATA
    medtune predict --model RUN --input CASES --output PREDICTIONS     # NIfTI label maps
    medtune evaluate --pred PREDICTIONS --gt DATA

Everything but the model is the segmentation task's (it is a subclass): datasets and the
derived facts (``label_values``, ``regions``), validation, prediction, scoring.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from medtune.finetune.base import Task
from medtune.finetune.segment3d.config import Segment3DConfig
from medtune.finetune.segmentation.task import SegmentationTask, label_spec_of


class Segment3DTask(SegmentationTask):
    name = "segment3d"
    config_class = Segment3DConfig
    unit = "crops"
    description = "whole-volume 3D networks from scratch (TransBTSV2, CGA U-Net, UNETR, SwinUNETR): NIfTI label maps"

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        """No task flags: the network and its options are the config's ``model:`` section."""

    def finetune_overrides(self, args: argparse.Namespace, raw: dict) -> list[str]:
        return []

    def load_config(self, raw: Mapping[str, Any]) -> Segment3DConfig:
        import torch

        from medtune.finetune.segment3d.model import build_network_segmenter

        cfg = Task.load_config(self, raw)
        # An unknown network, option or loss term, a crop the network cannot take, a loss the
        # network cannot feed: all fail here, before any data is read. On the meta device the
        # model costs nothing; a network that cannot be built there is checked when built.
        try:
            with torch.device("meta"):
                build_network_segmenter(cfg, num_classes=2)
        except (RuntimeError, NotImplementedError):
            pass
        return cfg

    def input_channels(self, cfg: Segment3DConfig) -> tuple[int, str]:
        return cfg.model.in_chans, "model.in_chans"

    def build_model(self, cfg: Segment3DConfig, derived: Mapping[str, Any], pretrained: bool = True):
        from medtune.finetune.segment3d.model import build_network_segmenter

        model = build_network_segmenter(cfg, label_spec_of(derived).num_classes)
        return self.ready_to_predict(model, cfg, derived)


TASK = Segment3DTask()
