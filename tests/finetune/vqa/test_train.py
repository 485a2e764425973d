"""End to end: a tiny MF2-MVQA model learns the generated VQA set, and its run folder reloads."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from medtune.cli import main as cli_main
from medtune.data.vqa import AnswerVocab, VQADataset, load_vqa_records
from medtune.finetune import load_trained
from medtune.finetune.vqa.evaluate import evaluate_vqa

from tests import REPO

DEMO_CONFIG = REPO / "configs" / "demo_vqa.yaml"


def _question_prior_accuracy(train, test) -> float:
    """Text-only baseline: the most common training answer of each question wording."""
    answers = defaultdict(Counter)
    for record in train:
        answers[record.question][record.answer] += 1
    hits = [answers[r.question].most_common(1)[0][0] == r.answer if r.question in answers else False for r in test]
    return sum(hits) / len(hits)


def test_tiny_vqa_learns_from_the_image_and_reloads(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert cli_main(["data", "synth", "--kind", "vqa", "--out", str(data), "--images", "160"]) == 0
    overrides = ["train.max_steps=60", "train.eval_every=30", "train.log_every=30"]
    argv = ["finetune", "--task", "vqa", "--config", str(DEMO_CONFIG), "--data", str(data), "--output", str(run)]
    argv += [arg for item in overrides for arg in ("--set", item)]
    assert cli_main(argv) == 0
    for name in ("config.json", "model.safetensors", "best/model.safetensors", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name

    summary = json.loads((run / "summary.json").read_text())
    final, majority = summary["final"], summary["majority_baseline"]
    train = load_vqa_records("vqa_rad", data, "train")
    test = load_vqa_records("vqa_rad", data, "test")
    prior = _question_prior_accuracy(train, test)  # knows the question, not the image
    assert final["accuracy"] > majority["accuracy"] + 0.3
    assert final["accuracy"] > prior + 0.1, (final, prior)
    assert final["n_all"] == len(test) and final["n_closed"] + final["n_open"] == len(test)

    # the run folder alone rebuilds the model: same answers, same accuracy
    loaded = load_trained(run, "last")
    model, cfg, answers = loaded.model, loaded.config, loaded.derived["answers"]
    assert cfg.model.fusion == "stagewise" and len(answers) == len(AnswerVocab.from_records(train))
    dataset = VQADataset(test, AnswerVocab(answers), model.text.tokenize, cfg.backbone.img_size, cfg.backbone.in_chans)
    assert evaluate_vqa(model, dataset) == pytest.approx(final)

    # medtune predict on the dataset folder: every eval question answered, same accuracy
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(run), "--input", str(data), "--output", str(tmp_path / "pred"),
                     "--checkpoint", "last"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(test)
    assert sum(r["answer"] == r["truth"] for r in rows) / len(rows) == pytest.approx(final["accuracy"])
    assert f"accuracy {final['accuracy']:.3f}" in capsys.readouterr().out

    # one question about one image
    out = tmp_path / "answers.jsonl"
    assert cli_main(["predict", "--model", str(run), "--input", str(test[0].image),
                     "--question", "is there a lesion in the brain?", "--output", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["answer"] in ("yes", "no") and 0 < row["probability"] <= 1

    # a finished run is never overwritten
    assert cli_main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
