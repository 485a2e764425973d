"""VQA evaluation split over processes: the gathered metrics are the single-process ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data.vqa import AnswerVocab, VQADataset, VQARecord
from medtune import distributed
from medtune.finetune import get_task
from medtune.finetune.vqa import build_vqa_model
from medtune.finetune.vqa.evaluate import answer_rows, evaluate_vqa, merge_vqa_rows

from tests import REPO


class Rank:  # what distributed.shard reads from an Accelerator
    def __init__(self, rank: int, world: int = 2) -> None:
        self.process_index, self.num_processes = rank, world


def predict_shard(model, dataset, rank=0, world=1, batch_size=64):
    return answer_rows(model, dataset, distributed.shard(len(dataset), Rank(rank, world)), batch_size)

DEMO_CONFIG = REPO / "configs" / "demo_vqa.yaml"


def test_sharded_evaluation_gives_the_single_process_metrics(tmp_path):
    torch.manual_seed(0)
    cfg = get_task("vqa").read_config(DEMO_CONFIG)
    answers = ["yes", "no", "1", "2", "left"]
    model = build_vqa_model(cfg, len(answers))
    questions = ["is there a lesion?", "how many lesions?", "which side?"]
    records = []
    for i in range(9):  # odd: rank 0 gets one question more than rank 1
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
        records.append(VQARecord(path, questions[i % 3], answers[i % 5], "closed" if i % 3 == 0 else "open", f"e#{i}"))
    dataset = VQADataset(records, AnswerVocab(answers), model.text.tokenize, 32, 1)
    # right on even questions, wrong on odd ones, and one answer outside the vocabulary
    pred = torch.tensor([row[1] for row in predict_shard(model, dataset)])
    dataset.answers = torch.where(torch.arange(9) % 2 == 0, pred, (pred + 1) % len(answers))
    dataset.answers[7] = AnswerVocab.UNKNOWN

    whole = evaluate_vqa(model, dataset, batch_size=4)
    assert whole["accuracy"] == 5 / 9 and whole["n_unknown"] == 1
    assert whole["accuracy_closed"] == 2 / 3 and whole["accuracy_open"] == 3 / 6
    shards = [predict_shard(model, dataset, rank, 2, batch_size=4) for rank in (0, 1)]
    assert [row[0] for row in shards[0]] == [0, 2, 4, 6, 8] and [row[0] for row in shards[1]] == [1, 3, 5, 7]
    # what gather_object hands every process: rank 0's rows, then rank 1's
    assert merge_vqa_rows(shards[0] + shards[1]) == whole
    assert sorted(shards[0] + shards[1]) == predict_shard(model, dataset, batch_size=4)
    # a rank without questions (more processes than questions) adds nothing
    assert predict_shard(model, dataset, 9, 10) == []


def test_merge_by_hand():
    rows = [(2, 1, 1, False), (0, 0, 0, True), (1, 3, -1, True)]  # question 1: answer not in the vocabulary
    assert merge_vqa_rows(rows) == {
        "accuracy": 2 / 3, "accuracy_closed": 1 / 2, "accuracy_open": 1.0,
        "n_all": 3.0, "n_closed": 2.0, "n_open": 1.0, "n_unknown": 1.0,
    }
    assert merge_vqa_rows([(0, 1, 1, True)]) == pytest.approx(
        {"accuracy": 1.0, "accuracy_closed": 1.0, "n_all": 1.0, "n_closed": 1.0, "n_open": 0.0, "n_unknown": 0.0}
    )  # no open question: accuracy_open left out
