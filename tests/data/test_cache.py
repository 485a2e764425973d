"""medtune.data: VolumeCache, Slice/Crop/Volume datasets, DataConfig builders."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medtune.config import from_dict
from medtune.data import (
    CropDataset,
    DataConfig,
    LabelSpec,
    SliceDataset,
    VolumeCache,
    VolumeDataset,
    build_labeled_dataset,
    build_pretrain_dataset,
    crop_to_bbox,
    find_cases,
    foreground_mask,
    load_case,
    paste_from_bbox,
    read_window,
    split_cases,
    zscore_nonzero,
)
from medtune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cache(synth_brats, tmp_path_factory) -> VolumeCache:
    return VolumeCache(find_cases(synth_brats), tmp_path_factory.mktemp("cache"), show_progress=False)


def test_cache_arrays_match_preprocessing_and_paste_back(cache, synth_brats):
    volume = load_case(find_cases(synth_brats)[1])
    cached = cache.load(1)
    meta = cache.meta(1)
    assert meta["original_shape"] == [32, 32, 16]
    bbox = tuple(tuple(b) for b in meta["bbox"])
    expected = zscore_nonzero(crop_to_bbox(volume.image, bbox))
    np.testing.assert_allclose(cached.image, expected, atol=1e-6)
    assert cached.image.dtype == np.float32 and cached.image.shape == (4, *cache.spatial_shape(1))
    np.testing.assert_array_equal(cached.foreground, foreground_mask(crop_to_bbox(volume.image, bbox), "all"))
    # the crop removed only background, and pasting the label back restores it
    assert (volume.image != 0).any(0).sum() == (expected != 0).any(0).sum()
    np.testing.assert_array_equal(paste_from_bbox(np.asarray(cached.label), bbox, (32, 32, 16)), volume.label)
    # sampled label locations all lie on label > 0
    loc = np.asarray(cached.label_locations)
    assert len(loc) == (cached.label > 0).sum() and (cached.label[tuple(loc.T)] > 0).all()


def test_cache_hits_are_memmaps_and_never_decode_nifti(synth_brats, tmp_path, monkeypatch):
    cases = find_cases(synth_brats)
    first = VolumeCache(cases, tmp_path, show_progress=False)

    def no_nifti(*args, **kwargs):
        raise AssertionError("nibabel.load called on a cache hit")

    monkeypatch.setattr(nib, "load", no_nifti)
    second = VolumeCache(cases, tmp_path, show_progress=False)
    for i in range(len(second)):
        cached = second.load(i)
        assert isinstance(cached.image, np.memmap) and isinstance(cached.label, np.memmap)
        assert not cached.image.flags.writeable
        assert cached.image.flags.f_contiguous  # a slice along the last axis is contiguous
        assert second.meta(i) == first.meta(i)
    item = SliceDataset(second, 16, with_label=True)[7]
    assert item["image"].shape == (4, 16, 16)
    # pickling (DataLoader workers) drops the open memory maps
    import pickle

    assert pickle.loads(pickle.dumps(second))._handles == {}


def test_cache_invalidated_when_source_changes(synth_brats, tmp_path, monkeypatch):
    data = Path(shutil.copytree(synth_brats, tmp_path / "data"))
    cases = find_cases(data)
    VolumeCache(cases, tmp_path / "cache", show_progress=False)
    loads = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: loads.append(Path(path).name) or real_load(path, *a, **k))
    flair = cases[2].images[0]
    stat = flair.stat()
    os.utime(flair, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache = VolumeCache(cases, tmp_path / "cache", show_progress=False)
    # only the touched case (4 modalities + label) was read again
    assert sorted(loads) == sorted(p.name for p in cases[2].files)
    assert cache.meta(2)["sources"][0]["mtime_ns"] == stat.st_mtime_ns + 10**9
    # a truncated cache file (crash) is rebuilt too
    loads.clear()
    image_file = cache.case_dir(0) / "image.npy"
    image_file.write_bytes(image_file.read_bytes()[:1000])
    cache = VolumeCache(cases, tmp_path / "cache", show_progress=False)
    assert sorted(loads) == sorted(p.name for p in cases[0].files)
    assert cache.load(0).image.shape[0] == 4


def test_cache_rebuilt_for_another_msd_channel_selection(tmp_path):
    import json

    rng = np.random.default_rng(0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image = np.zeros((12, 12, 6, 3), np.float32)
    image[2:10, 2:10, 1:5] = rng.normal(loc=[5.0, 50.0, 500.0], scale=[1.0, 10.0, 100.0], size=(8, 8, 4, 3))
    label = np.zeros((12, 12, 6), np.uint8)
    label[4:6, 4:6, 2:4] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "imagesTr" / "c1.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "labelsTr" / "c1.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}, "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"}],
    }))
    shared = tmp_path / "cache"
    assert VolumeCache(find_cases(tmp_path), shared, show_progress=False).load(0).image.shape[0] == 3
    for names in (("T2w",), ("FLAIR", "T1w")):
        cases = find_cases(tmp_path, modalities=names)
        reused = VolumeCache(cases, shared, show_progress=False).load(0).image
        fresh = VolumeCache(cases, tmp_path / f"fresh-{len(names)}", show_progress=False).load(0).image
        assert reused.shape[0] == len(names) and np.array_equal(reused, fresh), names


def test_cache_concurrent_builders_agree(synth_brats, tmp_path, monkeypatch):
    cases = find_cases(synth_brats)
    builds = []
    real_build = VolumeCache._build_case

    def counting_build(self, index):
        builds.append(index)
        return real_build(self, index)

    monkeypatch.setattr(VolumeCache, "_build_case", counting_build)
    with ThreadPoolExecutor(2) as pool:
        caches = list(pool.map(lambda _: VolumeCache(cases, tmp_path, show_progress=False), range(2)))
    assert sorted(builds) == [0, 1, 2]  # each case built once; the waiting builder reused it
    for i in range(len(cases)):
        np.testing.assert_array_equal(caches[0].load(i).image, caches[1].load(i).image)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_cache_label_values_checked(synth_brats, tmp_path):
    data = Path(shutil.copytree(synth_brats, tmp_path / "data"))
    seg = data / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    label = nib.load(str(seg)).get_fdata().astype(np.uint8)
    label[label == 4] = 3
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(seg))
    with pytest.raises(DataError, match="case BraTS20_Training_002: label .*seg.nii.gz.*\\[3\\]"):
        VolumeCache(find_cases(data), tmp_path / "cache", label_spec=LabelSpec.brats(), show_progress=False)
    # without a spec the cache builds; the dataset refuses the value when it converts it
    cache = VolumeCache(find_cases(data), tmp_path / "cache2", show_progress=False)
    dataset = CropDataset(cache, (40, 40, 20), with_label=True)
    with pytest.raises(DataError, match="case BraTS20_Training_002"):
        dataset[1]


def test_read_window_pads_outside():
    array = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    window = read_window(array, (-1, 3), (3, 4))
    assert window.shape == (2, 3, 4)
    np.testing.assert_array_equal(window[:, 1:, :2], array[:, 0:2, 3:5])
    assert window[:, 0].sum() == 0 and window[:, :, 2:].sum() == 0
    assert read_window(array, (10, 10), (2, 2)).sum() == 0


def test_slice_dataset_pairs_shapes_determinism(cache):
    dataset = SliceDataset(cache, 16, with_label=True, seed=1)
    depths = [cache.spatial_shape(i)[2] for i in range(len(cache))]
    assert len(dataset) == sum(depths)
    assert dataset.pairs.tolist() == [[c, s] for c, d in enumerate(depths) for s in range(d)]
    item = dataset[10]
    assert item["image"].shape == (4, 16, 16) and item["image"].dtype == torch.float32
    assert item["foreground"].shape == (16, 16) and item["foreground"].dtype == torch.bool
    assert item["label"].dtype == torch.int64 and int(item["label"].max()) <= 3
    # foreground agrees with the image: all modalities nonzero
    assert torch.equal(item["foreground"], (item["image"] != 0).all(0))
    again = SliceDataset(cache, 16, with_label=True, seed=1)[10]
    assert all(torch.equal(item[k], again[k]) for k in item)
    crops = [dataset[i]["image"] for i in range(0, len(dataset), 5)]
    dataset.set_epoch(1)
    moved = [dataset[i]["image"] for i in range(0, len(dataset), 5)]
    assert any(not torch.equal(a, b) for a, b in zip(crops, moved))
    # a shuffled loader mixes the slices of different volumes in one batch
    loader = DataLoader(range(len(dataset)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    first_batch = next(iter(loader))
    assert len({int(dataset.pairs[i, 0]) for i in first_batch}) > 1


def test_slice_dataset_padding_axis_and_min_foreground(cache):
    big = SliceDataset(cache, 48, with_label=True)
    case, index = big.pairs[5]
    item = big[5]
    cached = cache.load(int(case))
    plane = np.asarray(cached.foreground[..., int(index)])
    assert item["foreground"].sum() == plane.sum()  # the whole slice is inside the padded item
    assert item["image"].abs().sum() == pytest.approx(float(np.abs(cached.image[..., int(index)]).sum()), rel=1e-5)
    coronal = SliceDataset(cache, 12, axis=0)
    assert len(coronal) == sum(cache.spatial_shape(i)[0] for i in range(len(cache)))
    assert coronal[0]["image"].shape == (4, 12, 12)
    kept = SliceDataset(cache, 16, min_foreground=0.5)
    assert 0 < len(kept) < len(big)
    for c, s in kept.pairs:
        assert np.asarray(cache.load(int(c)).foreground[..., int(s)]).mean() >= 0.5


def test_crop_dataset_shapes_oversampling_padding(cache):
    dataset = CropDataset(cache, (16, 16, 8), samples_per_volume=3, with_label=True, foreground_oversample=1.0)
    assert len(dataset) == 9
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].shape == (4, 16, 16, 8) and item["foreground"].shape == (16, 16, 8)
        assert (item["label"] > 0).any()  # every crop centred on tumour
    again = CropDataset(cache, (16, 16, 8), samples_per_volume=3, with_label=True, foreground_oversample=1.0)
    assert torch.equal(dataset[4]["image"], again[4]["image"])
    padded = CropDataset(cache, (40, 40, 24))[0]
    shape = cache.spatial_shape(0)
    assert padded["image"].shape == (4, 40, 40, 24)
    assert int(padded["foreground"].sum()) == int(np.asarray(cache.load(0).foreground).sum())
    assert padded["image"].abs().sum() == pytest.approx(float(np.abs(cache.load(0).image).sum()), rel=1e-5)
    assert all(s < c for s, c in zip(shape, (40, 40, 24)))
    unlabeled = VolumeCache(cache.cases, cache.cache_dir, with_labels=False, show_progress=False)
    assert not unlabeled.has_label(0)
    with pytest.raises(DataError, match="no label"):
        CropDataset(unlabeled, (8, 8, 8), with_label=True)


def test_volume_dataset(cache):
    dataset = VolumeDataset(cache, with_label=True)
    item = dataset[2]
    assert item["image"].shape == (4, *cache.spatial_shape(2)) and int(item["case_index"]) == 2
    np.testing.assert_array_equal(
        LabelSpec.brats().to_values(item["label"].numpy()), np.asarray(cache.load(2).label)
    )


def test_data_config_builders_and_split(synth_brats, tmp_path):
    cfg = from_dict(DataConfig, {"root": str(synth_brats), "img_size": 16, "val_fraction": 0.34})
    run_dir = tmp_path / "checkpoints" / "run1"
    pretrain = build_pretrain_dataset(cfg, run_dir=run_dir, show_progress=False)
    assert isinstance(pretrain, SliceDataset) and len(pretrain) == len(pretrain.pairs) > 0
    assert "label" not in pretrain[0]
    cache_dirs = list((tmp_path / "checkpoints" / ".cache").iterdir())
    assert len(cache_dirs) == 1 and cache_dirs[0].name.startswith(synth_brats.name + "-")
    train = build_labeled_dataset(cfg, "train", run_dir=run_dir, show_progress=False)
    val = build_labeled_dataset(cfg, "val", run_dir=run_dir, show_progress=False)
    assert isinstance(val, VolumeDataset) and "label" in train[0]
    train_ids, val_ids = set(train.cache.case_ids), set(val.cache.case_ids)
    assert len(val_ids) == 1 and len(train_ids) == 2 and not train_ids & val_ids
    cases = find_cases(synth_brats)
    assert split_cases(cases[::-1], 0.34)[1][0].case_id in val_ids  # order-independent
    cfg3d = from_dict(DataConfig, {"root": str(synth_brats), "mode": "3d", "crop_size": [16, 16, 8],
                                   "samples_per_volume": 2, "cache_dir": str(tmp_path / "c3")})
    crops = build_labeled_dataset(cfg3d, "all", show_progress=False)
    assert isinstance(crops, VolumeDataset) and len(crops) == 3
    train3d = build_labeled_dataset(cfg3d, "train", show_progress=False)
    assert isinstance(train3d, CropDataset) and train3d[0]["label"].shape == (16, 16, 8)
    with pytest.raises(ConfigError, match="unknown config key 'imgsize'"):
        from_dict(DataConfig, {"imgsize": 3})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(DataConfig, {"mode": "4d"})
    with pytest.raises(ConfigError, match="data.root"):
        build_pretrain_dataset(DataConfig())
