"""The segmentation task: slice-wise volumetric segmentation with any adapter method.

    medtune finetune --config configs/medtuning_vit_b16_brats.yaml --data DATA --backbone PRETRAIN_RUN
    medtune predict --model RUN --input CASES --output PREDICTIONS
    medtune evaluate --pred PREDICTIONS --gt DATA

Derived facts recorded in ``config.json``: ``label_values`` (class order), ``label_names``,
``regions`` (scored regions, BraTS ET/TC/WT for BraTS data, else one per label),
``data_plan`` (the training grid's orientation and spacing, the intensity statistics:
what prediction repeats), ``layout`` and ``validation_cases``; the channel order the run
trained on is written into ``data.modalities``, the folds into ``splits_final.json``.
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
    names = tuple(derived["label_names"]) if derived.get("label_names") else None
    return LabelSpec(values, regions, names) if regions else LabelSpec.from_values(values)


def drop_other_methods_keys(adapter: Mapping[str, Any]) -> dict[str, Any]:
    """The ``adapter`` section without the keys that belong to another method than its
    ``method`` (a recipe's ``ratio`` after ``--set adapter.method=lora``), with a warning.
    Keys no method knows are kept, for the config to refuse as typos."""
    from dataclasses import fields

    from medtune.adapters import ADAPTERS
    from medtune.adapters.state import RECORD_KEYS

    section = dict(adapter)
    method = str(section.get("method", "med-tuning"))
    try:
        own = {f.name for f in fields(ADAPTERS.get(method).config_class)}
    except ConfigError:
        return section  # an unknown method is named by the config
    others = {f.name for name in ADAPTERS.names() for f in fields(ADAPTERS.get(name).config_class)} - own
    dropped = [k for k in section if k not in own and k not in RECORD_KEYS and k in others]
    if dropped:
        log.warning("adapter.method is %s: dropping %s (keys of another method)", method,
                    ", ".join(f"adapter.{k}" for k in dropped))
    return {k: v for k, v in section.items() if k not in dropped}


class SegmentationTask(Task):
    name = "segmentation"
    config_class = SegmentationConfig
    unit = "crops"
    description = "slice-wise volumetric segmentation (Med-Tuning, LoRA, ...): NIfTI label maps"
    predicts_in_parts = True

    # ------------------------------------------------------------------ command line

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.data.config import add_data_arguments

        add_data_arguments(parser, folds=True)
        parser.add_argument(
            "--adapter", default=None, metavar="METHOD",
            help="the tuning method (sets adapter.method; the recipe's keys of another method are dropped)",
        )
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
        from medtune.data.config import data_overrides
        from medtune.models.weights import pretrained_section

        overrides = data_overrides(args)
        if args.adapter:
            overrides.append(f"adapter.method={json.dumps(args.adapter)}")
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

        raw = dict(raw)
        if isinstance(raw.get("adapter"), Mapping):
            raw["adapter"] = drop_other_methods_keys(raw["adapter"])
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
        from medtune.checkpoints.runs import SPLITS_FILE
        from medtune.data.cases import detect_layout, resolve_modalities
        from medtune.data.config import build_labeled_data

        if cfg.data.root is None:
            raise ConfigError("no dataset: pass --data DIR or set data.root")
        if cfg.data.modalities is None:
            # record the channel order this run trains on, so that prediction on a dataset of
            # another layout (a BraTS-trained model on an MSD folder) reads the same channels
            cfg.data.modalities = resolve_modalities(cfg.data.root, cfg.data.layout)
        in_chans, key = self.input_channels(cfg)
        if len(cfg.data.modalities) != in_chans:
            raise ConfigError(
                f"{cfg.data.root}: cases have {len(cfg.data.modalities)} modalities but {key} is "
                f"{in_chans} (set data.modalities or {key})"
            )
        data = build_labeled_data(cfg.data, run_dir)
        if data.val is None and (cfg.data.val_fraction > 0 or cfg.data.folds or cfg.data.split):
            log.warning("%d labeled case(s): none held out, training without validation", len(data.train_ids))
        fold = f"fold {data.fold} of {len(data.splits)}" if len(data.splits) > 1 else "split"
        log.info("%s: %d training cases, %d validation cases%s", fold, len(data.train_ids), len(data.val_ids),
                 f": {', '.join(data.val_ids)}" if data.val_ids else "")
        spec = data.label_spec
        layout = cfg.data.layout if cfg.data.layout != "auto" else detect_layout(Path(cfg.data.root))
        derived = {
            "label_values": list(spec.values), "label_names": list(spec.names) if spec.names else None,
            "regions": {k: list(v) for k, v in spec.regions.items()},
            "data_plan": data.plan.to_json(), "layout": layout, "validation_cases": data.val_ids,
        }
        return TaskData(train=data.train, eval=data.val, derived=derived, num_workers=cfg.data.num_workers,
                        files={SPLITS_FILE: data.splits})

    def build_model(self, cfg, derived: Mapping[str, Any], pretrained: bool = True):
        from medtune.finetune.segmentation.model import build_segmenter

        spec = label_spec_of(derived)
        method = cfg.adapter.get("method")
        if pretrained and cfg.backbone.pretrained is None and method != "full":
            log.warning(
                "adapter %s on a randomly initialised frozen backbone (no --backbone, no backbone.pretrained): "
                "the frozen features are random; pass a pretraining run or weights, or use adapter.method=full",
                method,
            )
        model = build_segmenter(cfg, spec.num_classes, load_pretrained=pretrained)
        return self.ready_to_predict(model, cfg, derived)

    def ready_to_predict(self, model, cfg, derived: Mapping[str, Any]):
        """Give ``model`` what whole-volume prediction needs: the label values, the crop
        size and the run's data plan (grid and intensities; untouched for older runs)."""
        from medtune.data.plan import DataPlan

        model.label_spec, model.roi_size = label_spec_of(derived), cfg.roi_size
        plan = derived.get("data_plan")
        model.data_plan = DataPlan.from_json(plan) if plan else DataPlan.untouched(self.input_channels(cfg)[0])
        return model

    def evaluate(self, model, data: TaskData, cfg, processes) -> dict[str, float]:
        from medtune.finetune.segmentation.evaluate import validate_segmenter

        return validate_segmenter(model, data.eval, model.label_spec, cfg.roi_size, cfg.validation, processes)

    # ------------------------------------------------------------------ using a trained model

    def predict(self, loaded: Loaded, args: argparse.Namespace) -> int:
        from medtune.finetune.segmentation.predict import predict

        return predict(loaded, args)

    def predict_ensemble(self, loaded, args: argparse.Namespace) -> int:
        from medtune.finetune.segmentation.predict import predict_ensemble

        return predict_ensemble(loaded, args)

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
