"""The referring-segmentation task: CRIS-style masks for expressions on CLIP, optionally CM-MaskSD.

    medtune data synth --kind referring --out data/shapes         # a generated set, if you have none
    medtune finetune --config configs/demo_referring.yaml --data data/shapes --self-distill
    medtune predict --model RUN --input image.png --expression "the red circle"
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from medtune.errors import ConfigError
from medtune.finetune.base import Loaded, Task, TaskData
from medtune.finetune.referring.config import ReferringConfig

log = logging.getLogger(__name__)


class ReferringTask(Task):
    name = "referring"
    config_class = ReferringConfig
    best_metric = "oIoU"
    unit = "expressions"
    description = "referring image segmentation on CLIP (CRIS-style), CM-MaskSD with --self-distill"

    # ------------------------------------------------------------------ command line

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backbone", default=None, help="the CLIP architecture (open_clip name; sets model.clip_model)")
        parser.add_argument("--clip-weights", default=None, help="local CLIP weights (open_clip file or OpenAI .pt)")
        parser.add_argument("--self-distill", action="store_true", help="turn CM-MaskSD's masked branches on")

    def finetune_overrides(self, args: argparse.Namespace, raw: dict) -> list[str]:
        overrides = []
        if args.backbone:
            overrides.append(f"model.clip_model={json.dumps(str(args.backbone))}")
        if args.clip_weights:
            overrides.append(f"model.clip_weights={json.dumps(str(args.clip_weights))}")
        if args.self_distill:
            overrides.append("model.cmmasksd.enabled=true")
        return overrides

    def add_predict_arguments(self, parser: argparse.ArgumentParser) -> None:
        from medtune.finetune.referring.predict import add_predict_arguments

        add_predict_arguments(parser)

    # ------------------------------------------------------------------ training

    def build_data(self, cfg: ReferringConfig, run_dir: Path) -> TaskData:
        from medtune.data.referring import ReferringDataset, load_referring_records
        from medtune.models.clip import ClipTokenizer

        data = cfg.data
        if data.root is None:
            raise ConfigError("no referring data: pass --data (make a generated set with medtune data synth --kind referring)")
        train_records = load_referring_records(data.root, data.train_split, data.layout, data.dataset)
        val_records = load_referring_records(data.root, data.val_split, data.layout, data.dataset)
        if data.max_val_samples:
            val_records = val_records[: data.max_val_samples]
        tokenizer = ClipTokenizer(cfg.model.context_length)
        size, letterbox = cfg.model.image_size, cfg.model.letterbox
        train_set = ReferringDataset(train_records, tokenizer, size, cache=data.cache, letterbox=letterbox)
        val_set = ReferringDataset(val_records, tokenizer, size, cache=data.cache, letterbox=letterbox)
        log.info("referring: %d train / %d val expressions", len(train_set), len(val_set))
        return TaskData(train=train_set, eval=val_set)

    def build_model(self, cfg: ReferringConfig, derived: Mapping[str, Any], pretrained: bool = True):
        from medtune.finetune.referring.model import build_referring_model

        return build_referring_model(cfg.model, load_clip_weights=pretrained)

    def evaluate(self, model, data: TaskData, cfg: ReferringConfig, processes) -> dict[str, float]:
        from medtune.finetune.referring.evaluate import evaluate_referring

        return evaluate_referring(
            model, data.eval, cfg.eval.batch_size, cfg.eval.threshold, cfg.eval.original_size, processes
        )

    # ------------------------------------------------------------------ using a trained model

    def predict(self, loaded: Loaded, args: argparse.Namespace) -> int:
        from medtune.finetune.referring.predict import predict

        return predict(loaded, args)


TASK = ReferringTask()
