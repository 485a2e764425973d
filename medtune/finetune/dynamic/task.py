"""The ``dynamic`` task: Med-DANet (V1) and Med-DANet V2 per-slice dynamic inference.

    accelerate launch -m medtune finetune --task dynamic --config configs/meddanet_v2_brats.yaml --data DATA
    medtune predict --model RUN --input CASES --output PREDICTIONS    # label maps + per-case reports
    medtune evaluate --pred PREDICTIONS --gt DATA
    medtune params --dynamic RUN --data DATA                          # GFLOPs per volume vs static

Data (2D training slices of ``data.img_size``, whole held-out volumes), the derived
facts (label values, regions, data plan) and scoring are the segmentation task's; the
model is :class:`~.model.DynamicSegmenter`; validation predicts every held-out volume
slice by slice as prediction does and logs the Dice per region with the relative
cost-model FLOPs and how often each path was chosen.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from medtune.finetune.base import Loaded, Task, TaskData
from medtune.finetune.dynamic.config import DynamicConfig
from medtune.finetune.segmentation.task import SegmentationTask, label_spec_of


def phase_ends(cfg: DynamicConfig) -> tuple[int, int]:
    """Training batches (micro-batches) at which phases 1 and 2 end."""
    total = cfg.train.max_steps * cfg.train.grad_accum
    fractions = [f / sum(cfg.model.phases) for f in cfg.model.phases]
    first = round(total * fractions[0])
    return first, first + round(total * fractions[1])


class DynamicTask(SegmentationTask):
    name = "dynamic"
    config_class = DynamicConfig
    unit = "slices"
    description = "Med-DANet V1/V2: a Decision Network picks skip / crop / whole slice per slice; NIfTI + FLOPs reports"
    predicts_in_parts = True

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.data.config import add_data_arguments

        add_data_arguments(parser, folds=True)

    def finetune_overrides(self, args: argparse.Namespace, raw: dict) -> list[str]:
        from medtune.data.config import data_overrides

        return data_overrides(args)

    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.finetune.dynamic.predict import add_predict_arguments

        add_predict_arguments(parser)

    def load_config(self, raw: Mapping[str, Any]) -> DynamicConfig:
        import torch

        from medtune.finetune.dynamic.model import DynamicSegmenter
        from medtune.models.losses import LossContext, build_criterion

        cfg = Task.load_config(self, raw)
        # paths that a phase leaves out (the Decision Network in phases 1-2, the segmenter in 3)
        # get no gradient: DDP must not wait for them
        cfg.train.find_unused_parameters = True
        criterion = build_criterion(cfg.loss, LossContext(2, 2))  # unknown terms fail before any data is read
        with torch.device("meta"):  # unknown networks too, at no cost
            DynamicSegmenter(cfg.model, cfg.in_chans, 2, cfg.slice_size, criterion, load_pretrained=False)
        return cfg

    def input_channels(self, cfg: DynamicConfig) -> tuple[int, str]:
        return cfg.in_chans, "in_chans"

    def best_metric_of(self, cfg: DynamicConfig) -> str:
        return cfg.validation.best_metric

    def build_model(self, cfg: DynamicConfig, derived: Mapping[str, Any], pretrained: bool = True):
        from medtune.data.plan import DataPlan
        from medtune.finetune.dynamic.model import DynamicSegmenter
        from medtune.models.losses import LossContext, build_criterion

        spec = label_spec_of(derived)
        criterion = build_criterion(cfg.loss, LossContext(spec.num_classes, 2))
        model = DynamicSegmenter(cfg.model, cfg.in_chans, spec.num_classes, cfg.slice_size, criterion,
                                 phase_ends(cfg), cfg.train.grad_accum, load_pretrained=pretrained)
        model.label_spec, model.roi_size = spec, (*cfg.slice_size, 1)
        plan = derived.get("data_plan")
        model.data_plan = DataPlan.from_json(plan) if plan else DataPlan.untouched(cfg.in_chans)
        return model

    def evaluate(self, model, data: TaskData, cfg: DynamicConfig, processes) -> dict[str, float]:
        from medtune.finetune.dynamic.predict import validate_dynamic

        return validate_dynamic(model, data.eval, model.label_spec, cfg, processes)

    def predict(self, loaded: Loaded, args: argparse.Namespace) -> int:
        from medtune.finetune.dynamic.predict import predict

        return predict(loaded, args)

    def predict_ensemble(self, loaded, args: argparse.Namespace) -> int:
        return Task.predict_ensemble(self, loaded, args)

    def export_formats(self, loaded: Loaded) -> tuple[str, ...]:
        return ()


TASK = DynamicTask()
