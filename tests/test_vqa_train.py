"""End to end: a tiny MF2-MVQA model learns the generated VQA set, and its run folder reloads."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medtune.data.vqa import AnswerVocab, VQADataset, load_vqa_records
from medtune.errors import ConfigError
from medtune.finetune.vqa import evaluate_vqa, finetune_main, load_vqa_run, predict_main

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_vqa.yaml"


def _args(**kwargs) -> SimpleNamespace:
    base = dict(config=str(DEMO_CONFIG), data=None, output=None, set=[], resume=None, backbone=None,
                text_weights=None, clip_weights=None, self_distill=False, task="vqa")
    return SimpleNamespace(**{**base, **kwargs})


def _question_prior_accuracy(train, test) -> float:
    """Text-only baseline: the most common training answer of each question wording."""
    answers = defaultdict(Counter)
    for record in train:
        answers[record.question][record.answer] += 1
    hits = [answers[r.question].most_common(1)[0][0] == r.answer if r.question in answers else False for r in test]
    return sum(hits) / len(hits)


def test_tiny_vqa_learns_from_the_image_and_reloads(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    overrides = ["train.max_steps=50", "train.eval_every=0", "train.log_every=25", "data.generated_images=160"]
    assert finetune_main(_args(data=str(data), output=str(run), set=overrides)) == 0
    for name in ("config.json", "model.safetensors", "best_model.safetensors", "metrics.jsonl", "eval_metrics.json"):
        assert (run / name).is_file(), name

    summary = json.loads((run / "eval_metrics.json").read_text())
    final, majority = summary["final"], summary["majority_baseline"]
    train = load_vqa_records("vqa_rad", data, "train")
    test = load_vqa_records("vqa_rad", data, "test")
    prior = _question_prior_accuracy(train, test)  # knows the question, not the image
    assert final["accuracy"] > majority["accuracy"] + 0.3
    assert final["accuracy"] > prior + 0.1, (final, prior)
    assert final["n_all"] == len(test) and final["n_closed"] + final["n_open"] == len(test)

    # the run folder alone rebuilds the model: same answers, same accuracy
    model, cfg, answers = load_vqa_run(run)
    assert cfg.model.fusion == "stagewise" and len(answers) == len(AnswerVocab.from_records(train))
    dataset = VQADataset(test, AnswerVocab(answers), model.text.tokenize, cfg.backbone.img_size, cfg.backbone.in_chans)
    assert evaluate_vqa(model, dataset) == pytest.approx(final)

    image = test[0].image
    out = tmp_path / "answers.jsonl"
    assert predict_main(SimpleNamespace(input=str(image), question="is there a lesion in the brain?", output=str(out)), run) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["answer"] in ("yes", "no") and 0 < row["probability"] <= 1
    assert "answers written to" in capsys.readouterr().out

    # a finished run is never overwritten
    with pytest.raises(ConfigError, match="already holds a finished run"):
        finetune_main(_args(data=str(data), output=str(run), set=overrides))
