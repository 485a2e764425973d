"""medtune.data.augment: MONAI transforms that move image and label together, seeded by
(seed, epoch, index) on the loader workers, and replayed exactly by a resumed run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medtune.config import from_dict
from medtune.data import AugmentConfig, Augmenter, CropDataset, DataConfig, SliceDataset, VolumeCache, find_cases
from medtune.data.augment import sample_seed

SPATIAL_ONLY = dict(intensity_scale=0.0, intensity_shift=0.0)


@pytest.fixture(scope="module")
def cache(synth_brats, tmp_path_factory) -> VolumeCache:
    return VolumeCache(find_cases(synth_brats), tmp_path_factory.mktemp("cache"), show_progress=False)


def marked_sample(dims: int, size: int = 17):
    """A smooth bright blob in channel 0 whose centre voxel is labelled 2 (the rest 1 / 0)."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * dims, indexing="ij"))
    centre = np.array([5, 11, 8][:dims]).reshape((dims,) + (1,) * dims)
    distance = np.sqrt(((grid - centre) ** 2).sum(0))
    image = np.stack([np.exp(-distance**2 / 8.0), np.ones_like(distance)]).astype(np.float32)
    label = np.where(distance < 3, 1, 0).astype(np.int64)
    label[tuple(int(c) for c in centre.ravel())] = 2
    return {"image": image, "label": label, "foreground": label > 0}


@pytest.mark.parametrize("dims", [2, 3])
def test_flips_and_affine_move_image_and_label_together(dims):
    cfg = AugmentConfig(flip_prob=0.5, rotation=40.0, scale=0.2, affine_prob=1.0, rotate_in_plane=False,
                        **SPATIAL_ONLY)
    augment = Augmenter(cfg, dims)
    moved = 0
    for seed in range(6):
        sample = marked_sample(dims)
        out = augment(sample, seed)
        assert out["image"].shape == sample["image"].shape and out["label"].dtype == torch.int64
        assert out["foreground"].dtype == torch.bool and set(out["label"].unique().tolist()) <= {0, 1, 2}
        peak = np.unravel_index(int(out["image"][0].argmax()), out["image"].shape[1:])
        assert out["label"][peak] == 2, (seed, peak)  # the marker voxel stayed on its label
        assert torch.equal(out["foreground"], out["label"] > 0)  # masks follow with nearest too
        moved += not torch.equal(out["label"], torch.from_numpy(sample["label"]))
    assert moved >= 5  # the transforms did move things


def test_3d_rotation_stays_in_the_slice_plane_by_default():
    augment = Augmenter(AugmentConfig(flip_prob=0.0, rotation=90.0, affine_prob=1.0, **SPATIAL_ONLY), 3)
    image = np.zeros((1, 17, 17, 5), np.float32)
    image[0, 3:8, 4:14, 2] = 1.0
    out = augment({"image": image}, seed=3)["image"]
    assert torch.nonzero(out[0].abs().sum((0, 1))).flatten().tolist() == [2]  # still slice 2 only
    assert not torch.equal(out, torch.from_numpy(image))


def test_intensity_transforms_touch_the_image_only():
    cfg = AugmentConfig(flip_prob=0.0, gamma_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    sample = marked_sample(3)
    out = Augmenter(cfg, 3)(sample, seed=1)
    assert torch.equal(out["label"], torch.from_numpy(sample["label"]))
    assert not torch.allclose(out["image"], torch.from_numpy(sample["image"]))
    # FreMIM's scale and shift are drawn per channel
    plain = Augmenter(AugmentConfig(flip_prob=0.0), 2)({"image": np.ones((2, 4, 4), np.float32)}, seed=2)["image"]
    assert plain[0].unique().numel() == 1 and plain[0, 0, 0] != plain[1, 0, 0]
    # the official code draws them per channel and per column (second spatial axis)
    columns = Augmenter(AugmentConfig(flip_prob=0.0, intensity_per="column"), 3)(
        {"image": np.ones((2, 3, 5, 4), np.float32)}, seed=2)["image"]
    assert torch.equal(columns[:, :1].expand_as(columns)[..., :1], columns[..., :1])  # constant along H
    assert columns[0, 0, :, 0].unique().numel() == 5 and torch.equal(columns[..., :1].expand_as(columns), columns)


def test_same_seed_same_batch_in_any_worker_layout_and_new_epochs_differ(cache):
    augment = Augmenter(AugmentConfig(rotation=15.0, affine_prob=0.5), 2)
    dataset = SliceDataset(cache, 16, with_label=True, seed=3, augment=augment)
    in_process = next(iter(DataLoader(dataset, batch_size=6)))
    with_workers = next(iter(DataLoader(dataset, batch_size=6, num_workers=2)))
    assert all(torch.equal(in_process[k], with_workers[k]) for k in in_process)
    plain = SliceDataset(cache, 16, with_label=True, seed=3)
    assert not torch.equal(in_process["image"], next(iter(DataLoader(plain, batch_size=6)))["image"])
    dataset.set_epoch(1)
    assert not torch.equal(in_process["image"], next(iter(DataLoader(dataset, batch_size=6)))["image"])
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_data_config_turns_augmentation_on_and_off(synth_brats, tmp_path):
    from medtune.data.config import build_labeled_data

    cfg = from_dict(DataConfig, {"root": str(synth_brats), "mode": "3d", "crop_size": [16, 16, 8],
                                 "cache_dir": str(tmp_path), "augment": {"rotation": 10}})
    data = build_labeled_data(cfg, show_progress=False)
    assert data.train.augment is not None and data.train.augment.spatial_dims == 3
    assert data.train.augment.cfg.rotation == 10 and data.train.augment.cfg.flip_prob == 0.5  # the rest: defaults
    off = from_dict(DataConfig, {"root": str(synth_brats), "mode": "3d", "cache_dir": str(tmp_path), "augment": None})
    assert build_labeled_data(off, show_progress=False).train.augment is None
    with pytest.raises(Exception, match="flip_prob"):
        from_dict(DataConfig, {"augment": {"flip_prob": 1.5}})


class TinySegmenter(nn.Module):
    """A conv net with dropout: training draws random numbers besides the data's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Conv3d(8, 4, 1))

    def forward(self, batch: dict) -> dict:
        logits = self.net(batch["image"])
        return {"loss": nn.functional.cross_entropy(logits, batch["label"])}


def test_resume_equality_with_augmentation_on(cache, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from medtune.trainer import OptimConfig, TrainConfig, build_loader, train

    augment = Augmenter(AugmentConfig(rotation=20.0, scale=0.1, affine_prob=0.5, noise_prob=0.3), 3)
    dataset = CropDataset(cache, (16, 16, 8), samples_per_volume=3, with_label=True, seed=1, augment=augment)
    cfg = TrainConfig(max_steps=6, batch_size=2, save_every=3, log_every=1, mixed_precision="no",
                      optim=OptimConfig(lr=0.01))

    def run(run_dir, steps_before_kill=None, resume=None, seed=0):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.manual_seed(seed)
        model = TinySegmenter()
        if steps_before_kill is not None:
            calls = {"n": 0}
            original = model.forward

            def dying(batch):
                calls["n"] += 1
                if calls["n"] > steps_before_kill:
                    raise KeyboardInterrupt("simulated kill")
                return original(batch)

            model.forward = dying
            with pytest.raises(KeyboardInterrupt):
                train(model, build_loader(dataset, cfg), cfg, run_dir)
            return None
        train(model, build_loader(dataset, cfg), cfg, run_dir, resume=resume)
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", steps_before_kill=4)  # dies in step 5, after the state of step 3
    resumed = run(tmp_path / "killed", resume="latest", seed=7)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
