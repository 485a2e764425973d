"""PNE loss: pixel-embedding contrastive loss with positives and negatives treated equally.

The seed paper's loss is reconstructed (DESIGN.md section 9; no official code): a
projection head gives L2-normalised pixel embeddings; anchors favour hard
(misclassified) pixels; every anchor is compared with equally many positives (same
class) and negatives (other classes), and

    loss(a) = -log( mean_p e^(s_ap / t) / (mean_p e^(s_ap / t) + mean_n e^(s_an / t)) ),   t = 0.1

with ``s`` the cosine similarity: means, not sums, over both sets, so neither side
outweighs the other by its count. It is added to the segmentation loss with a weight
(``loss: {dice_ce: 1.0, pne: 0.1}``) for any model whose outputs hold an ``embedding``
(the last decoder map: every decoder's ``forward_decoder``, every network's).

**medtune's reading**, each an option of :class:`PNEOptions`:

- Projection head: two 1x1 layers (``C -> hidden -> embed_dim``, ReLU between) applied
  only to the sampled pixels (the same as a 1x1-conv head on the whole map, without
  projecting every voxel of a 3D volume); it is trained with the model, kept in its
  weights, and unused at inference.
- Labels and predictions (argmax of the logits) are resampled to the embedding's size
  by nearest neighbour.
- Anchors: for each class present in the batch (and only when another class is present
  to give negatives), ``anchors_per_class`` pixels, a ``hard_fraction`` of them
  misclassified where there are enough, the rest correctly classified (and the other
  way round when either kind runs short), drawn without replacement.
- Pairs: ``pairs`` positives and ``pairs`` negatives per anchor, drawn uniformly with
  replacement from the batch's pixels of the anchor's class and of the other classes.
- A batch with one class only gives no anchors and a loss of 0 (finite, with gradient
  edges to the head, so that multi-process training sees every parameter used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medtune.errors import ConfigError
from medtune.models.losses import LossContext, LossTerm


@dataclass
class PNEOptions:
    """Options of the ``pne`` loss term."""

    temperature: float = 0.1  # t of the similarities s / t
    embed_dim: int = 64  # width of the projected, L2-normalised embedding
    hidden_dim: int | None = None  # projection head's hidden width (None: the embedding's channels)
    anchors_per_class: int = 32  # anchors drawn per class present in the batch
    hard_fraction: float = 0.5  # fraction of anchors drawn among misclassified pixels
    pairs: int = 64  # positives per anchor, and as many negatives

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {self.hard_fraction}")
        for name in ("embed_dim", "anchors_per_class", "pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- sampling


def sample_anchors(labels: torch.Tensor, predictions: torch.Tensor, per_class: int, hard_fraction: float) -> torch.Tensor:
    """Anchor pixel indices into ``labels (N,)``: per class present (when at least two
    are), up to ``per_class`` pixels, ``round(per_class * hard_fraction)`` of them
    misclassified (``predictions != labels``) where possible, the rest filled from the
    other kind. Returns ``(A,)`` int64 (empty when fewer than two classes are present)."""
    classes = labels.unique()
    if classes.numel() < 2:
        return labels.new_empty(0, dtype=torch.long)
    chosen = []
    for cls in classes:
        members = (labels == cls).nonzero()[:, 0]
        wrong = predictions[members] != cls
        hard, easy = members[wrong], members[~wrong]
        take = min(per_class, members.numel())
        n_hard = min(hard.numel(), round(take * hard_fraction))
        n_easy = min(easy.numel(), take - n_hard)
        n_hard = take - n_easy  # the easy pixels ran short: more hard ones
        chosen += [hard[torch.randperm(hard.numel(), device=hard.device)[:n_hard]],
                   easy[torch.randperm(easy.numel(), device=easy.device)[:n_easy]]]
    return torch.cat(chosen)


def sample_pairs(labels: torch.Tensor, anchors: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` positives (same class) and ``pairs`` negatives (any other class) per anchor,
    uniformly with replacement: ``(A, pairs)`` and ``(A, pairs)`` indices into ``labels (N,)``.
    Every anchor's class must have a pixel of another class in ``labels``."""
    order = labels.argsort()  # pixel indices grouped by class
    sorted_labels = labels[order]
    anchor_class = labels[anchors]  # (A,)
    start = torch.searchsorted(sorted_labels, anchor_class)  # first pixel of the class in `order`
    count = torch.searchsorted(sorted_labels, anchor_class, right=True) - start
    others = labels.numel() - count
    if (others < 1).any():
        raise ValueError("an anchor's class has no negatives in the batch")
    draw = torch.rand(anchors.numel(), pairs, device=labels.device)
    pos_rank = (draw * count[:, None]).long().clamp_max(count[:, None] - 1)
    positives = order[start[:, None] + pos_rank]
    draw = torch.rand(anchors.numel(), pairs, device=labels.device)
    neg_rank = (draw * others[:, None]).long().clamp_max(others[:, None] - 1)
    neg_rank = neg_rank + count[:, None] * (neg_rank >= start[:, None])  # skip the anchor's own class block
    negatives = order[neg_rank]
    return positives, negatives


def pne_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors of ``-log(P / (P + N))``, ``P = mean_p e^(s_ap/t)``, ``N = mean_n e^(s_an/t)``.

    ``anchor (A, D)``, ``positive (A, m, D)``, ``negative (A, m', D)``, all L2-normalised.
    Computed in log space (``softplus(log N - log P)``), finite for any ``t``.
    """
    s_ap = torch.einsum("ad,amd->am", anchor, positive) / temperature
    s_an = torch.einsum("ad,amd->am", anchor, negative) / temperature
    log_p = torch.logsumexp(s_ap, dim=1) - math.log(s_ap.shape[1])
    log_n = torch.logsumexp(s_an, dim=1) - math.log(s_an.shape[1])
    return F.softplus(log_n - log_p).mean()


def contrast(embeddings: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, options: PNEOptions,
             project=None) -> torch.Tensor:
    """The PNE loss of pixel features ``embeddings (N, C)`` (gathered lazily: only sampled
    rows are read), ``labels (N,)``, ``predictions (N,)``; ``project`` maps ``(R, C)`` rows
    to L2-normalised ``(R, D)`` (default: L2 normalisation only)."""
    project = project or (lambda rows: F.normalize(rows, dim=-1))
    with torch.no_grad():
        anchors = sample_anchors(labels, predictions, options.anchors_per_class, options.hard_fraction)
        if anchors.numel() == 0:
            return None  # type: ignore[return-value]
        positives, negatives = sample_pairs(labels, anchors, options.pairs)
    rows = project(embeddings[torch.cat([anchors, positives.flatten(), negatives.flatten()])])
    count, m = anchors.numel(), options.pairs
    anchor, positive, negative = rows[:count], rows[count:count + count * m], rows[count + count * m:]
    return pne_loss(anchor, positive.reshape(count, m, -1), negative.reshape(count, m, -1), options.temperature)


# --------------------------------------------------------------------------- the loss term


class PixelRows:
    """``(B, C, *S)`` map indexed by flat pixel numbers without copying it: ``rows[i] -> (len(i), C)``."""

    def __init__(self, feature_map: torch.Tensor) -> None:
        self.flat = feature_map.flatten(2)  # (B, C, N) view
        self.pixels = self.flat.shape[2]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.flat[index // self.pixels, :, index % self.pixels]  # (len, C)


class PNELoss(LossTerm):
    """``pne``: the PNE loss of ``outputs["embedding"]`` through a projection head."""

    options_class = PNEOptions
    requires = ("logits", "embedding")

    def __init__(self, context: LossContext, options: PNEOptions) -> None:
        super().__init__()
        if not context.embedding_channels:
            raise ConfigError("loss 'pne' needs a model with a pixel embedding")
        channels = context.embedding_channels
        hidden = options.hidden_dim or channels
        self.options = options
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, options.embed_dim))

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(rows.float()), dim=-1)

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        embedding, logits = outputs["embedding"], outputs["logits"]
        size = tuple(embedding.shape[2:])
        with torch.no_grad():
            predicted = logits.argmax(1)
            if tuple(label.shape[1:]) != size:
                label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
                predicted = F.interpolate(predicted[:, None].float(), size=size, mode="nearest")[:, 0].long()
        loss = contrast(PixelRows(embedding), label.reshape(-1), predicted.reshape(-1), self.options, self.project)
        if loss is None:  # one class only: nothing to contrast; keep every head parameter in the graph
            return sum(p.sum() for p in self.head.parameters()) * 0.0 + embedding.sum() * 0.0
        return loss


__all__ = ["PNELoss", "PNEOptions", "PixelRows", "contrast", "pne_loss", "sample_anchors", "sample_pairs"]
