"""CT intensities (nnU-Net's scheme, statistics of the training cases only), splits and folds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtune.config import from_dict
from medtune.data import DataConfig, find_cases
from medtune.data.intensity import ChannelNorm, Normalizer, channel_schemes, ct_statistics, foreground
from medtune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synth_ct(tmp_path_factory):
    from medtune.data.synth import synthesize_ct

    root = tmp_path_factory.mktemp("synth_ct")
    synthesize_ct(root, cases=4, shape=(32, 32, 8), seed=0, test_cases=1)
    return root


def test_schemes_by_modality_and_ct_foreground():
    assert channel_schemes("auto", ["CT"]) == ("ct",)
    assert channel_schemes("auto", ["flair", "t1"]) == ("zscore", "zscore")
    assert channel_schemes("ct", ["T2w"]) == ("ct",)
    with pytest.raises(ConfigError, match="normalization"):
        channel_schemes("minmax", ["CT"])
    image = np.array([[[-1000.0, -700.0, -80.0, 0.0, 40.0]]])  # air, lung, fat, water, tissue
    assert foreground(image[:, :, :, None], ("ct",))[..., 0].tolist() == [[False, False, True, True, True]]
    assert foreground(image[:, :, :, None], ("zscore",))[..., 0].tolist() == [[True, True, True, False, True]]


def test_ct_statistics_are_nnunets_and_normalise_the_same_way_everywhere():
    samples = np.random.default_rng(0).normal(60.0, 20.0, size=20_000)
    samples[:50] = 3000.0  # metal
    norm = ct_statistics(samples)
    low, high = np.percentile(samples, [0.5, 99.5])
    assert (norm.low, norm.high) == pytest.approx((low, high)) and norm.mean == pytest.approx(samples.mean())
    normalizer = Normalizer([norm, ChannelNorm("zscore")])
    image = np.stack([np.array([[[-1000.0, 60.0, 3000.0]]]), np.array([[[0.0, 2.0, 4.0]]])]).astype(np.float32)
    out = normalizer(image)
    expected_ct = (np.clip([-1000.0, 60.0, 3000.0], norm.low, norm.high) - norm.mean) / norm.std
    np.testing.assert_allclose(out[0].ravel(), expected_ct, rtol=1e-5)
    np.testing.assert_allclose(out[1].ravel(), [0.0, -1.0, 1.0], atol=1e-6)  # MRI: z-score over nonzero
    assert Normalizer.from_json(json.loads(json.dumps(normalizer.to_json()))).norms == normalizer.norms


def test_ct_statistics_come_from_the_training_cases_only(synth_ct, tmp_path):
    from medtune.data.config import build_labeled_data
    from medtune.data.volume import load_case

    cfg = from_dict(DataConfig, {"root": str(synth_ct), "mode": "3d", "crop_size": [16, 16, 4], "folds": 2,
                                 "fold": 0, "cache_dir": str(tmp_path / "cache")})
    data = build_labeled_data(cfg, show_progress=False)
    norm = data.plan.normalizer.norms[0]
    assert norm.scheme == "ct" and data.plan.axcodes == "RAS"

    def stats_of(ids):
        cache = data.train.cache if set(ids) == set(data.train_ids) else data.val.cache
        values = [np.asarray(cache.load(i).image[0])[np.asarray(cache.load(i).label) > 0] for i in range(len(cache))]
        return np.concatenate(values)

    train_values = stats_of(data.train_ids)
    assert norm.mean == pytest.approx(train_values.mean(), rel=1e-6)
    assert (norm.low, norm.high) == pytest.approx(tuple(np.percentile(train_values, [0.5, 99.5])))
    everything = np.concatenate([train_values, stats_of(data.val_ids)])
    assert abs(everything.mean() - norm.mean) > 1e-3  # the held-out cases did not count
    # the cache keeps HU (air stays -1000: CT background is not 0); samples come out normalised
    raw = np.asarray(data.train.cache.load(0).image[0])
    assert raw.min() < -900
    item = data.train[0]["image"][0].numpy()
    assert item.min() >= (norm.low - norm.mean) / norm.std - 1.0  # clipped (a 10 % intensity jitter aside)
    # prediction normalises a raw case with the stored statistics
    case = next(c for c in find_cases(synth_ct) if c.case_id == data.val_ids[0])
    volume = load_case(case)
    prepared = data.plan.prepare(volume.image, volume.affine)
    assert prepared.image.max() <= (norm.high - norm.mean) / norm.std + 1e-4
    changed = type(data.plan)(data.plan.axcodes, data.plan.spacing, Normalizer([ChannelNorm("ct", -100, 100, 0, 1)]))
    assert not np.allclose(changed.prepare(volume.image, volume.affine).image, prepared.image)


def test_kfold_and_split_file_folds(synth_ct, tmp_path):
    from medtune.data.splits import kfold_splits, plan_split

    cases = find_cases(synth_ct)
    folds = kfold_splits([c.case_id for c in cases], 2)
    assert kfold_splits([c.case_id for c in reversed(cases)], 2) == folds  # order-independent
    assert sorted(sum((f["val"] for f in folds), [])) == sorted(c.case_id for c in cases)  # each validates once
    split_file = tmp_path / "splits_final.json"
    split_file.write_text(json.dumps([{"train": ["ct_001", "ct_002"], "val": ["ct_003"]},
                                      {"train": ["ct_003", "ct_004"], "val": ["ct_001", "ct_002"]}]))
    train, val, splits = plan_split(cases, val_fraction=0.2, split=str(split_file), folds=None, fold=1)
    assert [c.case_id for c in train] == ["ct_003", "ct_004"] and [c.case_id for c in val] == ["ct_001", "ct_002"]
    assert splits[0]["val"] == ["ct_003"]
    split_file.write_text(json.dumps([{"train": ["ct_001", "ct_009"], "val": ["ct_010"]}]))
    with pytest.raises(DataError, match="not in the dataset: ct_009, ct_010"):
        plan_split(cases, val_fraction=0.2, split=str(split_file), folds=None, fold=0)
    with pytest.raises(ConfigError, match="data.fold 3"):
        plan_split(cases, val_fraction=0.2, split=None, folds=2, fold=3)
    with pytest.raises(ConfigError, match="exclude"):
        from_dict(DataConfig, {"split": str(split_file), "folds": 5})
