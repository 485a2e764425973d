"""VQA accuracy (all, closed, open), answering a dataset, evaluation split over processes."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from medtune import distributed
from medtune.finetune.vqa.model import VQAModel

log = logging.getLogger(__name__)


def vqa_accuracy(pred: torch.Tensor, target: torch.Tensor, closed: torch.Tensor) -> dict[str, float]:
    """Accuracy over all, closed and open questions.

    ``pred (N,)`` answer indices, ``target (N,)`` (-1 = answer not in the vocabulary:
    always wrong), ``closed (N,)`` bool. An empty subset's accuracy is NaN. Also returns
    the counts ``n_all``, ``n_closed``, ``n_open`` and ``n_unknown``.
    """
    correct = (pred == target) & (target >= 0)
    closed = closed.bool()

    def mean(selected: torch.Tensor) -> float:
        count = int(selected.sum())
        return float(correct[selected].sum()) / count if count else float("nan")

    everything = torch.ones_like(closed)
    return {
        "accuracy": mean(everything),
        "accuracy_closed": mean(closed),
        "accuracy_open": mean(~closed),
        "n_all": float(len(target)),
        "n_closed": float(closed.sum()),
        "n_open": float((~closed).sum()),
        "n_unknown": float((target < 0).sum()),
    }


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_dataset(model: VQAModel, dataset, batch_size: int = 64, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Answers for every item of a :class:`~medtune.data.vqa.VQADataset`, in order.

    Returns ``pred (N,)``, ``prob (N,)`` (softmax of the chosen answer), ``target (N,)``
    and ``closed (N,)``.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds, probs, targets, closed = [], [], [], []
    for batch in loader:
        logits = model.answer_logits(
            batch["image"].to(device), batch["question_ids"].to(device), batch["question_mask"].to(device)
        )
        prob, pred = logits.float().softmax(-1).max(-1)
        preds.append(pred.cpu())
        probs.append(prob.cpu())
        targets.append(batch["answer"])
        closed.append(batch["closed"])
    model.train(was_training)
    return {"pred": torch.cat(preds), "prob": torch.cat(probs), "target": torch.cat(targets), "closed": torch.cat(closed)}


def report_unknown_answers(dataset, max_examples: int = 3) -> int:
    """Log how many evaluation answers are not in the vocabulary (counted wrong), with examples."""
    unknown = (dataset.answers < 0).nonzero().flatten().tolist()
    if unknown:
        examples = "; ".join(
            f"{dataset.records[i].question!r} -> {dataset.records[i].answer!r}" for i in unknown[:max_examples]
        )
        log.warning(
            "%d of %d evaluation answers are not in the training answer vocabulary and count as wrong, e.g. %s",
            len(unknown), len(dataset), examples,
        )
    return len(unknown)


VQARow = tuple[int, int, int, bool]  # (question index, predicted answer, true answer or -1, closed)


def answer_rows(
    model: VQAModel, dataset, indices: list[int] | None = None, batch_size: int = 64, num_workers: int = 0
) -> list[VQARow]:
    """One ``(index, pred, target, closed)`` row per question of ``indices`` (None: all);
    target -1: the answer is not in the vocabulary."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        return []
    out = predict_dataset(model, Subset(dataset, indices), batch_size, num_workers)
    return list(zip(indices, out["pred"].tolist(), out["target"].tolist(), out["closed"].bool().tolist()))


def merge_vqa_rows(rows: Sequence[VQARow]) -> dict[str, float]:
    """:func:`vqa_accuracy` of the rows of every shard, in question order (empty subsets left out)."""
    rows = sorted(rows)
    pred = torch.tensor([row[1] for row in rows], dtype=torch.long)
    target = torch.tensor([row[2] for row in rows], dtype=torch.long)
    closed = torch.tensor([row[3] for row in rows], dtype=torch.bool)
    metrics = vqa_accuracy(pred, target, closed)
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def evaluate_vqa(
    model: VQAModel, dataset, batch_size: int = 64, num_workers: int = 0, processes: Any = None
) -> dict[str, float]:
    """:func:`vqa_accuracy` of ``model`` on ``dataset`` (empty subsets left out).

    With several ``processes`` (an Accelerator or PartialState) each one answers every
    ``num_processes``-th question and the rows are gathered
    (:func:`medtune.distributed.split_gather`), so every process returns the
    single-process metrics and no question is answered twice (then every process must
    call this).
    """
    rows = distributed.split_gather(
        processes, len(dataset), lambda indices: answer_rows(model, dataset, indices, batch_size, num_workers)
    )
    return merge_vqa_rows(rows)


def majority_baseline(dataset) -> dict[str, float]:
    """Accuracy of always giving the most frequent training answer (vocabulary index 0)."""
    pred = torch.zeros_like(dataset.answers)
    return vqa_accuracy(pred, dataset.answers, dataset.closed)
