"""The PNE loss: hand-worked values, equal positives and negatives, hard anchors, missing classes."""

from __future__ import annotations

import math

import pytest
import torch

from medtune.models.losses import LossContext
from medtune.models.pne import PNELoss, PNEOptions, contrast, pne_loss, sample_anchors, sample_pairs


def test_pne_loss_by_hand():
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # similarities 1 and 0
    negative = torch.tensor([[[-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])  # -1, 0, 0
    t = 0.5
    p = (math.exp(1 / t) + math.exp(0)) / 2
    n = (math.exp(-1 / t) + 2 * math.exp(0)) / 3
    expected = -math.log(p / (p + n))
    assert abs(pne_loss(anchor, positive, negative, t).item() - expected) < 1e-6


def test_embeddings_clustered_by_class_score_lower_than_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    prototypes = torch.eye(8)[:3] * 3
    clustered = prototypes[labels] + torch.randn(600, 8, generator=g)
    shuffled = clustered[torch.randperm(600, generator=g)]
    predictions = torch.where(torch.rand(600, generator=g) < 0.2, (labels + 1) % 3, labels)
    options = PNEOptions(anchors_per_class=16, pairs=32)
    torch.manual_seed(0)
    low = contrast(clustered, labels, predictions, options)
    torch.manual_seed(0)
    high = contrast(shuffled, labels, predictions, options)
    assert low < 0.5 * high, (low, high)


def test_every_anchor_gets_equally_many_positives_and_negatives():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 50 + [1] * 7 + [3] * 20)  # class 2 missing
    predictions = labels.clone()
    predictions[:10] = 1  # ten hard pixels of class 0
    predictions[50:52] = 0  # two hard pixels of class 1
    anchors = sample_anchors(labels, predictions, per_class=6, hard_fraction=0.5)
    assert torch.bincount(labels[anchors], minlength=4).tolist() == [6, 6, 0, 6]
    hard = predictions[anchors] != labels[anchors]
    assert hard[labels[anchors] == 0].sum() == 3  # half of the class-0 anchors are misclassified
    assert hard[labels[anchors] == 1].sum() == 2  # class 1 has only two hard pixels: the rest easy
    positives, negatives = sample_pairs(labels, anchors, pairs=9)
    assert positives.shape == negatives.shape == (18, 9)
    assert torch.equal(labels[positives], labels[anchors][:, None].expand(18, 9))
    assert (labels[negatives] != labels[anchors][:, None]).all()
    assert set(labels[negatives].unique().tolist()) == {0, 1, 3}


def test_the_loss_term_is_finite_with_a_missing_class_and_zero_with_a_single_one():
    torch.manual_seed(0)
    term = PNELoss(LossContext(4, 3, 6, ("logits", "embedding")), PNEOptions(embed_dim=4, anchors_per_class=4, pairs=8))
    embedding = torch.randn(2, 6, 4, 4, 2, requires_grad=True)
    logits = torch.randn(2, 4, 8, 8, 4)
    label = torch.randint(0, 2, (2, 8, 8, 4)) * 3  # classes 0 and 3 only; resampled to the embedding's size
    loss = term({"logits": logits, "embedding": embedding}, label)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(embedding.grad).all()
    single = term({"logits": logits, "embedding": embedding}, torch.zeros(2, 8, 8, 4, dtype=torch.long))
    single.backward()
    assert single.item() == 0.0 and all(p.grad is not None for p in term.head.parameters())


def test_the_projection_head_reads_only_the_sampled_pixels():
    from medtune.models.pne import PixelRows

    feature_map = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    rows = PixelRows(feature_map)
    flat = feature_map.movedim(1, -1).reshape(-1, 3)  # (B * H * W, C)
    index = torch.tensor([0, 7, 20, 39])
    assert torch.equal(rows[index], flat[index])


def test_pne_options_are_checked():
    from medtune.errors import ConfigError
    from medtune.models.losses import parse_loss_section

    with pytest.raises(ConfigError, match="loss.pne.*temperature must be > 0"):
        parse_loss_section({"pne": {"weight": 0.1, "temperature": 0.0}})
