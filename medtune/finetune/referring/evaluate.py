"""Referring evaluation split over processes: per-sample counts, merged into oIoU/mIoU/prec@X."""

from __future__ import annotations

import torch

from medtune import distributed
from medtune.finetune.referring.metrics import intersection_and_union, referring_metrics_from_counts
from medtune.finetune.referring.model import ReferringSegmenter


ReferringRow = tuple[int, int, int]  # (sample index, intersection, union) in pixels


@torch.no_grad()
def referring_counts(
    model: ReferringSegmenter,
    dataset,
    indices: list[int] | None = None,
    batch_size: int = 16,
    threshold: float = 0.5,
    original_size: bool = False,
) -> list[ReferringRow]:
    """Per-sample intersection and union for ``indices`` of a :class:`ReferringDataset` (None: all).

    With ``original_size`` each prediction is upsampled to its image's size and scored
    against the full-resolution mask; otherwise both are at the model's input size.
    """
    from torch.utils.data import DataLoader, Subset

    shard = dataset if indices is None else Subset(dataset, indices)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[ReferringRow] = []
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False):
        tokens = batch["tokens"].to(device)
        index = batch["index"].tolist()  # positions in the whole dataset
        if not original_size:
            probs = model.predict(batch["image"].to(device), tokens)
            intersection, union = intersection_and_union(probs > threshold, batch["mask"].to(device) > 0.5)
            rows += zip(index, intersection.tolist(), union.tolist())
            continue
        logits = model.forward_branch(batch["image"].to(device), tokens).logits  # [B, 1, h, w]
        for logit, sample in zip(logits, index):
            truth = torch.from_numpy(dataset.load_mask(sample)).to(device)  # [H, W]
            prob = torch.sigmoid(model.logits_on_image(logit[None], tuple(truth.shape)))  # [1, 1, H, W]
            intersection, union = intersection_and_union(prob[0] > threshold, truth[None])
            rows.append((sample, int(intersection), int(union)))
    model.train(was_training)
    return rows


def merge_referring_counts(rows: list[ReferringRow]) -> dict[str, float]:
    """oIoU (total I / total U), mIoU and prec@X from the rows of every shard, in sample order.

    Per-sample IoU is a function of that sample's (I, U) alone, so the merged metrics
    are those of one process scoring every sample.
    """
    if not rows:
        raise ValueError("no referring samples were scored")
    rows = sorted(rows)
    intersection = torch.tensor([row[1] for row in rows], dtype=torch.long)
    union = torch.tensor([row[2] for row in rows], dtype=torch.long)
    return referring_metrics_from_counts(intersection, union)


def evaluate_referring(
    model: ReferringSegmenter,
    dataset,
    batch_size: int = 16,
    threshold: float = 0.5,
    original_size: bool = False,
    processes=None,
) -> dict[str, float]:
    """oIoU, mIoU, prec@X of ``model`` on a :class:`ReferringDataset`.

    With several ``processes`` (an Accelerator or PartialState) each one scores every
    ``num_processes``-th sample and the per-sample counts are gathered
    (:func:`medtune.distributed.split_gather`), so every process returns the
    single-process metrics and no sample is scored twice (then every process must call this).
    """
    rows = distributed.split_gather(
        processes, len(dataset),
        lambda indices: referring_counts(model, dataset, indices, batch_size, threshold, original_size),
    )
    return merge_referring_counts(rows)
