"""The VQA task: MF2-MVQA stage-wise fusion (or the MMBERT-style baseline) on any backbone.

    medtune data synth --kind vqa --out data/vqa                   # a generated set, if you have none
    medtune finetune --task vqa --config configs/demo_vqa.yaml --data data/vqa
    medtune predict --model RUN --input slice.png --question "is there a lesion?"

Derived facts recorded in ``config.json``: ``answers``, the answer vocabulary (class order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from medtune.finetune.base import Loaded, Task, TaskData
from medtune.finetune.vqa.config import VQAConfig

log = logging.getLogger(__name__)


class VQATask(Task):
    name = "vqa"
    config_class = VQAConfig
    best_metric = "accuracy"
    unit = "questions"
    description = "medical visual question answering (MF2-MVQA stage-wise fusion, or fusion: mmbert)"

    # ------------------------------------------------------------------ command line

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--backbone", default=None,
            help="image backbone: a pretraining run folder (its architecture and weights; the config's "
            "img_size is kept), a local weight file for the configured backbone, or a backbone name",
        )
        parser.add_argument(
            "--text-weights", "--clip-weights", dest="text_weights", default=None,
            help="local text-encoder weights: a CLIP checkpoint (text.kind open_clip) or a Hugging Face folder (hf)",
        )

    def finetune_overrides(self, args: argparse.Namespace, raw: dict) -> list[str]:
        from medtune.models.weights import pretrained_section

        overrides = []
        if args.backbone:
            path = Path(args.backbone)
            if path.exists():
                section = pretrained_section(path)
                if "name" in section:  # a run folder: its architecture, this config's image size
                    img_size = (raw.get("backbone") or {}).get("img_size")
                    section = {**section, **({"img_size": img_size} if img_size is not None else {})}
                    overrides.append(f"backbone={json.dumps(section)}")
                else:
                    overrides.append(f"backbone.pretrained={json.dumps(section['pretrained'])}")
            else:  # a backbone name, randomly initialised
                overrides.append(f"backbone.name={json.dumps(str(args.backbone))}")
        if args.text_weights:
            kind = (raw.get("text") or {}).get("kind", "open_clip")
            key = "text.path" if kind == "hf" else "text.weights"
            overrides.append(f"{key}={json.dumps(str(args.text_weights))}")
        return overrides

    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.finetune.vqa.predict import add_predict_arguments

        add_predict_arguments(parser)

    # ------------------------------------------------------------------ training

    def build_data(self, cfg: VQAConfig, run_dir: Path) -> TaskData:
        from medtune.finetune.vqa.data import build_datasets
        from medtune.finetune.vqa.evaluate import majority_baseline, report_unknown_answers
        from medtune.models.text import build_tokenizer

        train_set, eval_set, vocab = build_datasets(cfg, build_tokenizer(cfg.text))
        report_unknown_answers(eval_set)
        baseline = majority_baseline(eval_set)
        log.info(
            "%d training / %d evaluation questions, %d answers; majority answer '%s' scores %.3f",
            len(train_set), len(eval_set), len(vocab), vocab.decode(0), baseline["accuracy"],
        )
        return TaskData(train=train_set, eval=eval_set, derived={"answers": list(vocab.answers)})

    def build_model(self, cfg: VQAConfig, derived: Mapping[str, Any], pretrained: bool = True):
        from medtune.finetune.vqa.model import build_vqa_model

        if not pretrained:  # every weight comes from the run's own files
            cfg = dataclasses.replace(
                cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=None),
                text=dataclasses.replace(cfg.text, weights=None),
            )
        return build_vqa_model(cfg, len(derived["answers"]))

    def evaluate(self, model, data: TaskData, cfg: VQAConfig, processes) -> dict[str, float]:
        from medtune.finetune.vqa.evaluate import evaluate_vqa

        return evaluate_vqa(model, data.eval, cfg.eval_batch_size, processes=processes)

    def summary_extras(self, cfg: VQAConfig, data: TaskData) -> dict[str, Any]:
        from medtune.finetune.vqa.evaluate import majority_baseline

        baseline = majority_baseline(data.eval)
        return {"majority_baseline": {k: v for k, v in baseline.items() if not math.isnan(v)}}

    # ------------------------------------------------------------------ using a trained model

    def predict(self, loaded: Loaded, args: argparse.Namespace) -> int:
        from medtune.finetune.vqa.predict import predict

        return predict(loaded, args)


TASK = VQATask()
