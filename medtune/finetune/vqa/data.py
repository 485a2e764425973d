"""The VQA task's data: records of a split, datasets and the answer vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.errors import ConfigError
from medtune.finetune.vqa.config import DATA_FORMATS, VQAConfig, VQADataConfig
from medtune.models.text import Tokenize


def load_split(cfg: VQADataConfig, split: str, root: str | Path | None = None):
    """The records of ``split`` of the dataset at ``root`` (default ``cfg.root``)."""
    from medtune.data.vqa import load_vqa_records

    root = root if root is not None else cfg.root
    if not root:
        raise ConfigError("no VQA dataset: pass --data DIR (make a generated set with medtune data synth --kind vqa)")
    if cfg.format not in DATA_FORMATS:
        raise ConfigError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got '{cfg.format}'")
    options: dict[str, Any] = {"image_dir": cfg.image_dir}
    if cfg.format == "slake":
        options["languages"] = tuple(cfg.languages)
    return load_vqa_records(cfg.format, Path(root), split, **options)


def build_datasets(cfg: VQAConfig, tokenize: Tokenize):
    """Training and evaluation :class:`~medtune.data.vqa.VQADataset` plus the vocabulary."""
    from medtune.data.vqa import AnswerVocab, VQADataset

    train_records = load_split(cfg.data, cfg.data.train_split)
    eval_records = load_split(cfg.data, cfg.data.eval_split)
    vocab = AnswerVocab.from_records(train_records, cfg.data.min_answer_count)
    size, chans = cfg.backbone.img_size, cfg.backbone.in_chans
    train_set = VQADataset(train_records, vocab, tokenize, size, chans)
    eval_set = VQADataset(eval_records, vocab, tokenize, size, chans)
    return train_set, eval_set, vocab
