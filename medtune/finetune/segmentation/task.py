"""The segmentation task: slice-wise volumetric segmentation with any adapter method.

    medtune finetune --config configs/medtuning_vit_b16_brats.yaml --data DATA --backbone PRETRAIN_RUN
    medtune predict --model RUN --input CASES --output PREDICTIONS
    medtune evaluate --pred PREDICTIONS --gt DATA

Derived facts recorded in ``config.json``: ``label_values`` (class order) and ``regions``
(scored regions, BraTS ET/TC/WT or one per label); the channel order the run trained
on is written into ``data.modalities``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from medtune.errors import ConfigError
from medtune.finetune.base import Loaded, Task, TaskData
from medtune.finetune.segmentation.config import SegmentationConfig

log = logging.getLogger(__name__)


def label_spec_of(derived: Mapping[str, Any]):
    """The :class:`~medtune.data.labels.LabelSpec` recorded in a run's derived facts."""
    from medtune.data.labels import LabelSpec

    values = tuple(int(v) for v in derived["label_values"])
    regions = {k: tuple(v) for k, v in (derived.get("regions") or {}).items()}
    return LabelSpec(values, regions, None) if regions else LabelSpec.from_values(values)


class SegmentationTask(Task):
    name = "segmentation"
    config_class = SegmentationConfig
    unit = "crops"
    description = "slice-wise volumetric segmentation (Med-Tuning, LoRA, ...): NIfTI label maps"

    # ------------------------------------------------------------------ command line

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--backbone", default=None,
            help="pretrained backbone: a pretraining run folder (its backbone section and "
            "backbone.safetensors replace the config's) or a local weight file (sets backbone.pretrained)",
        )
        parser.add_argument(
            "--self-distill", action="store_true",
            help="add masked-input self-distillation (the config's self_distill section, or its defaults)",
        )

    def finetune_overrides(self, args: argparse.Namespace, raw: dict) -> list[str]:
        from medtune.models.weights import pretrained_section

        overrides = []
        if args.backbone:
            section = pretrained_section(args.backbone)
            if "name" in section:  # a run folder: its architecture too
                overrides.append(f"backbone={json.dumps(section)}")
            else:
                overrides.append(f"backbone.pretrained={json.dumps(section['pretrained'])}")
        if args.self_distill and raw.get("self_distill") is None:
            overrides.append("self_distill={}")
        return overrides

    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.finetune.segmentation.predict import add_predict_arguments

        add_predict_arguments(parser)

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.finetune.segmentation.score import add_evaluate_arguments

        add_evaluate_arguments(parser)

    # ------------------------------------------------------------------ config

    def load_config(self, raw: Mapping[str, Any]):
        from medtune.adapters import adapter_config_from_dict
        from medtune.finetune.segmentation.model import dice_ce_defaults
        from medtune.models.losses import parse_loss_section

        cfg = super().load_config(raw)
        adapter_config_from_dict(cfg.adapter)  # unknown adapter keys fail before any data is read
        parse_loss_section(cfg.loss, dice_ce_defaults(cfg.model))  # and unknown loss terms or options
        return cfg

    def input_channels(self, cfg) -> tuple[int, str]:
        """The model's input channel count and the config key that sets it."""
        return cfg.backbone.in_chans, "backbone.in_chans"

    def best_metric_of(self, cfg) -> str:
        return cfg.validation.best_metric

    # ------------------------------------------------------------------ training

    def build_data(self, cfg, run_dir: Path) -> TaskData:
        from medtune.data.cases import find_cases, resolve_modalities
        from medtune.data.config import build_labeled_dataset, label_spec_for, split_cases

        if cfg.data.root is None:
            raise ConfigError("no dataset: pass --data DIR or set data.root")
        spec = label_spec_for(cfg.data)
        if cfg.data.modalities is None:
            # record the channel order this run trains on, so that prediction on a dataset of
            # another layout (a BraTS-trained model on an MSD folder) reads the same channels
            cfg.data.modalities = resolve_modalities(cfg.data.root, cfg.data.layout)
        cases = find_cases(cfg.data.root, cfg.data.layout, cfg.data.modalities, require_labels=True)
        in_chans, key = self.input_channels(cfg)
        if cases and cases[0].num_modalities != in_chans:
            raise ConfigError(
                f"{cfg.data.root}: cases have {cases[0].num_modalities} modalities but {key} is "
                f"{in_chans} (set data.modalities or {key})"
            )
        validate = cfg.data.val_fraction > 0 and bool(split_cases(cases, cfg.data.val_fraction)[1])
        if cfg.data.val_fraction > 0 and not validate:
            log.warning("%d labeled case(s): none held out, training without validation", len(cases))
        train_set = build_labeled_dataset(cfg.data, "train", run_dir)
        val_set = build_labeled_dataset(cfg.data, "val", run_dir) if validate else None
        derived = {"label_values": list(spec.values), "regions": {k: list(v) for k, v in spec.regions.items()}}
        return TaskData(train=train_set, eval=val_set, derived=derived, num_workers=cfg.data.num_workers)

    def build_model(self, cfg, derived: Mapping[str, Any], pretrained: bool = True):
        from medtune.finetune.segmentation.model import build_segmenter

        spec = label_spec_of(derived)
        model = build_segmenter(cfg, spec.num_classes, load_pretrained=pretrained)
        model.label_spec, model.roi_size = spec, cfg.roi_size  # for whole-volume prediction
        return model

    def evaluate(self, model, data: TaskData, cfg, processes) -> dict[str, float]:
        from medtune.finetune.segmentation.evaluate import validate_segmenter

        return validate_segmenter(model, data.eval, model.label_spec, cfg.roi_size, cfg.validation, processes)

    # ------------------------------------------------------------------ using a trained model

    def predict(self, loaded: Loaded, args: argparse.Namespace) -> int:
        from medtune.finetune.segmentation.predict import predict

        return predict(loaded, args)

    def score(self, args: argparse.Namespace) -> int:
        from medtune.finetune.segmentation.score import score

        return score(args)

    def export_formats(self, loaded: Loaded) -> tuple[str, ...]:
        return ("onnx",)

    def export(self, loaded: Loaded, out_dir: Path, fmt: str) -> Path:
        """``onnx``: ``model.onnx`` for one window of ``data.crop_size`` (:mod:`.deploy`)."""
        from medtune.checkpoints.runs import ONNX_FILE
        from medtune.finetune.segmentation.deploy import export_onnx

        if fmt != "onnx":
            return super().export(loaded, out_dir, fmt)
        cfg = loaded.config
        return export_onnx(loaded.model, cfg.backbone.in_chans, cfg.roi_size, out_dir / ONNX_FILE)


TASK = SegmentationTask()
