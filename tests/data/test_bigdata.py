"""Data larger than the cache: the compressed cache format and the pretraining stream."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medtune.data import (
    ChunkedArray,
    CropDataset,
    DataConfig,
    SliceDataset,
    VolumeCache,
    build_pretrain_data,
    find_cases,
    stream_order,
    write_chunked,
)
from medtune.data.stream import CaseReader
from medtune.errors import ConfigError, DataError
from medtune.trainer import OptimConfig, ScheduleConfig, TrainConfig, build_loader, train


@pytest.fixture(scope="module")
def caches(synth_brats, tmp_path_factory) -> dict[str, VolumeCache]:
    cases = find_cases(synth_brats)
    return {fmt: VolumeCache(cases, tmp_path_factory.mktemp(fmt), show_progress=False, cache_format=fmt)
            for fmt in ("npy", "compressed")}


def test_compressed_cache_holds_exactly_the_npy_arrays(caches):
    npy, compressed = caches["npy"], caches["compressed"]
    for i in range(len(npy)):
        a, b = npy.load(i), compressed.load(i)
        assert isinstance(b.image, ChunkedArray) and b.image.dtype == np.float32 and b.foreground.dtype == np.bool_
        for name in ("image", "foreground", "label", "label_locations"):
            np.testing.assert_array_equal(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), err_msg=name)
        facts = ("shape", "bbox", "original_shape", "spacing", "grid")
        assert {k: compressed.meta(i)[k] for k in facts} == {k: npy.meta(i)[k] for k in facts}
        assert sorted(compressed.meta(i)["arrays"]) == ["foreground.zst", "image.zst", "label.zst", "label_locations.zst"]
    # the datasets cut the same slices and crops from either format
    for make in (lambda c: SliceDataset(c, 16, with_label=True, seed=3),
                 lambda c: CropDataset(c, (16, 16, 8), 2, with_label=True, seed=3)):
        left, right = make(npy), make(compressed)
        for index in (0, 5, len(left) - 1):
            for key, value in left[index].items():
                assert torch.equal(value, right[index][key]), key


def test_a_crop_decompresses_only_the_chunks_it_overlaps(tmp_path):
    volume = np.random.default_rng(0).normal(size=(4, 130, 70, 20)).astype(np.float32)
    write_chunked(tmp_path / "v.zst", volume, spatial=(64, 64, 8))  # chunk grid 4 x 3 x 2 x 3
    array = ChunkedArray(tmp_path / "v.zst")
    crop = array[:, 60:70, 10:20, 2:6]  # y crosses a chunk border: 2 chunks per modality
    np.testing.assert_array_equal(crop, volume[:, 60:70, 10:20, 2:6])
    assert array.chunks_read == 4 * 2
    array.chunks_read = 0
    np.testing.assert_array_equal(array[1, :, :, 17], volume[1, :, :, 17])  # one slice: 3 x 2 chunks
    assert array.chunks_read == 3 * 2
    array.chunks_read = 0
    np.testing.assert_array_equal(array[..., ::-3], volume[..., ::-3])
    np.testing.assert_array_equal(np.asarray(array), volume)
    assert array.chunks_read == 2 * 72  # the stepped read and the whole array
    # float noise does not compress; the byte shuffle still keeps it under the raw size
    assert (tmp_path / "v.zst").stat().st_size < volume.nbytes


def test_a_damaged_chunk_names_the_file(caches, tmp_path):
    source = caches["compressed"].case_dir(0) / "image.zst"
    damaged = tmp_path / "image.zst"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the checksum of the chunk holding this byte fails
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"image\.zst: chunk \d+ is damaged"):
        np.asarray(ChunkedArray(damaged))
    damaged.write_bytes(source.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"image\.zst: chunk \d+ is damaged \(10 bytes missing"):
        np.asarray(ChunkedArray(damaged))
    damaged.write_bytes(b"MTCHUNK1\x05")
    with pytest.raises(DataError, match=r"image\.zst: unreadable compressed cache file"):
        ChunkedArray(damaged)


def test_a_cache_of_the_other_format_is_rebuilt(caches, synth_brats, monkeypatch):
    folder = caches["npy"].cache_dir
    again = VolumeCache(find_cases(synth_brats), folder, show_progress=False, cache_format="compressed")
    assert json.loads((again.case_dir(0) / "meta.json").read_text())["settings"]["format"] == "compressed"
    np.testing.assert_array_equal(np.asarray(again.load(0).image), np.asarray(caches["compressed"].load(0).image))


def test_stream_order_every_item_once_seeded_and_bounded():
    items, cases = stream_order(num_cases=7, per_case=3, buffer_size=4, seed=1, epoch=0)
    assert sorted(items) == list(range(21)) and sorted(cases) == list(range(7))
    assert (items, cases) == stream_order(7, 3, 4, seed=1, epoch=0)
    assert items != stream_order(7, 3, 4, seed=2, epoch=0)[0] and items != stream_order(7, 3, 4, seed=1, epoch=1)[0]
    # a case's items enter once 3 x (its rank) items have, of which at most 4 (the buffer) wait:
    # so none leaves before position 3 x rank - 4, and the buffer does mix cases
    rank = {case: at for at, case in enumerate(cases)}
    assert all(at >= 3 * rank[item // 3] - 4 for at, item in enumerate(items))
    assert [rank[item // 3] for item in items] != sorted(rank[item // 3] for item in items)


def stream_config(root: Path, **changes) -> DataConfig:
    values = dict(root=str(root), stream=True, mode="3d", crop_size=[16, 16, 8], samples_per_volume=3,
                  stream_buffer=4, num_workers=2, augment=None)
    return DataConfig(**{**values, **changes})


def test_stream_reads_each_case_once_per_epoch_and_skips_without_reading(synth_brats, tmp_path, monkeypatch):
    reads: Counter = Counter()
    original = CaseReader.read
    monkeypatch.setattr(CaseReader, "read", lambda self, i: (reads.update([i]), original(self, i))[1])
    stream, plan = build_pretrain_data(stream_config(synth_brats), tmp_path / "runs" / "r")
    assert len(stream) == 9 and plan.axcodes == "RAS"
    assert not (tmp_path / "runs" / ".cache").exists()  # nothing cached
    stream.set_epoch(1)
    epoch = list(stream)
    assert reads == Counter({0: 1, 1: 1, 2: 1})
    order, _ = stream.order()
    for item, index in zip(epoch, order):  # item i is the same whatever the order
        assert torch.equal(item["image"], stream[index]["image"])
    # resume at item 7: only the cases of the last two items are read again
    reads.clear()
    stream.set_epoch(1)
    stream.skip_items(7)
    rest = list(stream)
    assert [torch.equal(a["image"], b["image"]) for a, b in zip(rest, epoch[7:])] == [True, True]
    assert set(reads) == {index // 3 for index in order[7:]} and len(rest) == 2
    # 2D: slices per case drawn among the case's slices
    slices, _ = build_pretrain_data(stream_config(synth_brats, mode="2d", img_size=16), tmp_path / "runs" / "r")
    assert [item["image"].shape for item in slices] == [(4, 16, 16)] * 9


def test_stream_refuses_what_it_cannot_do(synth_brats):
    from medtune.data import build_labeled_data

    with pytest.raises(ConfigError, match="data.stream is for pretraining"):
        build_labeled_data(stream_config(synth_brats))
    with pytest.raises(ConfigError, match="data.stream: CT channels"):
        build_pretrain_data(stream_config(synth_brats, normalization="ct"))
    with pytest.raises(ValueError, match="data.cache_format"):
        DataConfig(cache_format="zarr")


class PooledRegressor(nn.Module):
    """Mean of each channel -> a number; dropout draws random numbers like masking does."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.3)
        self.calls, self.fail_at_call = 0, fail_at_call

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        pooled = self.dropout(batch["image"].flatten(2).mean(-1))  # (B, M)
        return {"loss": (self.linear(pooled).squeeze(-1) - 1.0).pow(2).mean()}


def test_a_resumed_stream_run_ends_with_the_uninterrupted_weights(synth_brats, tmp_path):
    cfg = TrainConfig(max_steps=7, batch_size=2, save_every=3, log_every=1, mixed_precision="no",
                      optim=OptimConfig(name="adam", lr=0.05), schedule=ScheduleConfig(name="constant"))

    def run(model: nn.Module, name: str, resume: str | None = None) -> None:
        stream, _ = build_pretrain_data(stream_config(synth_brats), tmp_path / name)
        train(model, build_loader(stream, cfg, num_workers=2), cfg, tmp_path / name, resume=resume)

    straight = PooledRegressor()
    run(straight, "straight")  # 9 crops an epoch: 4 batches of 2, so step 3's save lies mid-epoch 0
    with pytest.raises(KeyboardInterrupt):
        run(PooledRegressor(fail_at_call=6), "killed")  # steps 4-5 are lost
    resumed = PooledRegressor()
    run(resumed, "killed", resume="latest")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    losses = lambda run_name: [json.loads(line)["loss"]  # noqa: E731
                               for line in (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()]
    assert losses("killed") == losses("straight")
