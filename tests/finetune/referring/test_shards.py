"""Referring evaluation split over processes: the gathered metrics are the single-process ones."""

from __future__ import annotations

import pytest
import torch

from medtune.data.referring import ReferringDataset, load_referring_records
from medtune.data.synth import synthesize_referring
from medtune import distributed
from medtune.finetune.referring import CMMaskSDConfig, ReferringModelConfig, build_referring_model
from medtune.finetune.referring.evaluate import evaluate_referring, merge_referring_counts, referring_counts


@pytest.mark.parametrize("original_size", [False, True])
def test_sharded_evaluation_gives_the_single_process_metrics(tmp_path, original_size, tiny_clip_config):
    records = load_referring_records(synthesize_referring(tmp_path, num_images=4, image_size=32, seed=1))
    torch.manual_seed(0)
    cfg = ReferringModelConfig(tiny_clip=tiny_clip_config, image_size=32, context_length=8, fusion_dim=16,
                               decoder_layers=1, decoder_heads=2, decoder_ffn_dim=16, cmmasksd=CMMaskSDConfig())
    model = build_referring_model(cfg)
    dataset = ReferringDataset(records, model.tokenizer, 32)
    assert len(dataset) >= 4

    whole = evaluate_referring(model, dataset, batch_size=3, threshold=0.5, original_size=original_size)

    class Rank:  # what distributed.shard reads from an Accelerator
        def __init__(self, rank: int) -> None:
            self.process_index, self.num_processes = rank, 2

    shards = [referring_counts(model, dataset, distributed.shard(len(dataset), Rank(r)), 3, 0.5, original_size)
              for r in (0, 1)]
    assert [row[0] for row in shards[0]] == list(range(0, len(dataset), 2))
    assert [row[0] for row in shards[1]] == list(range(1, len(dataset), 2))
    # what gather_object hands every process: rank 0's rows, then rank 1's
    assert merge_referring_counts(shards[0] + shards[1]) == whole
    assert whole["num_samples"] == len(dataset)
    # per sample, too: each (index, I, U) row is the one a single process finds
    assert sorted(shards[0] + shards[1]) == referring_counts(model, dataset, None, 3, 0.5, original_size)
    # a rank without samples (more processes than samples) adds nothing
    assert referring_counts(model, dataset, [], 3, 0.5, original_size) == []


def test_merge_by_hand():
    """oIoU is total I / total U over all shards, mIoU and prec@X over per-sample IoUs."""
    rows = [(2, 0, 0), (0, 3, 4), (1, 1, 4)]  # sample 2: both masks empty, IoU 1
    metrics = merge_referring_counts(rows)
    assert metrics["oIoU"] == 4 / 8
    assert metrics["mIoU"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    assert metrics["prec@0.5"] == pytest.approx(2 / 3) and metrics["prec@0.9"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no referring samples"):
        merge_referring_counts([])
