"""Fixtures shared by every folder: a tiny generated BraTS dataset, written once per test
session, the tiny ViT that segmentation and pretraining tests build on, and the tiny
segmentation and pretraining recipes the CLI tests (and the fault table) run, and run
folders made by hand (no training) for the tests of exports and loaders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # medtune.models imports timm: only the tests that build a model pay for it
    from medtune.models import BackboneConfig


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs 2 workers on 2 cores) each worker computes
    with one thread: two workers of two threads each would oversubscribe the cores, and
    tiny models then run many times slower."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state (the process group, the gradient state); every
    test that trains in-process starts from a clean one."""
    yield
    import sys

    if "accelerate" in sys.modules:  # nothing to reset in tests that never imported it
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def synth_brats(tmp_path_factory) -> Path:
    """Root of a 3-case synthetic BraTS-2020-style dataset, volumes 32x32x16.

    Case folders ``BraTS20_Training_00{1,2,3}/`` with ``*_{flair,t1,t1ce,t2,seg}.nii.gz``,
    labels in {0, 1, 2, 4}. Treat it as read-only: it is shared by every test.
    """
    from medtune.data.synth import synthesize_brats

    root = tmp_path_factory.mktemp("synth_brats")
    synthesize_brats(root, cases=3, shape=(32, 32, 16), seed=0)
    return root


def _tiny_vit() -> BackboneConfig:
    from medtune.models import BackboneConfig

    return BackboneConfig(name="vit_tiny_patch16_224", in_chans=4, img_size=32, options={"depth": 4})


@pytest.fixture
def tiny_vit_config() -> BackboneConfig:
    """timm's ViT-Tiny cut to 4 blocks (width 192, 3 heads, 16 px patches; each block's
    output is one of its 4 feature stages) on 4-channel 32 px slices: 2 x 2 tokens. A fresh
    config per test; change sizes with ``dataclasses.replace``."""
    return _tiny_vit()


@pytest.fixture(scope="session")
def tiny_segmenter_args() -> dict:
    """Keyword arguments of ``medtune.checkpoints.params.segmentation_config`` (and of
    ``compare_methods``, less ``method``): the tiny ViT (4 blocks, width 192) on 4-channel
    32 px slices, crops of 4 slices, a decoder of 8 channels. Shared by the session: read
    it, change a copy (``{**tiny_segmenter_args, "slices": 2}``)."""
    vit = _tiny_vit()
    return dict(backbone=vit.name, in_chans=vit.in_chans, img_size=vit.img_size, slices=4,
                backbone_options=vit.options, decoder_options={"channels": 8})


@pytest.fixture(scope="session")
def tiny_segmentation_recipe(tiny_segmenter_args) -> dict:
    """A segmentation recipe (the mapping a ``--config`` YAML file holds) for the CLI on
    ``synth_brats``: 3D crops of 32 x 32 x 4, a third of the cases for validation; the tiny
    ViT (4 blocks, width 192, 4-channel 32 px slices) with Med-Tuning and a 16-channel
    decoder; 3 steps of batch 2, evaluated at steps 2 and 3, saved at step 2. Shared by the
    session: write a changed copy, never change it."""
    side, slices = tiny_segmenter_args["img_size"], tiny_segmenter_args["slices"]
    return {
        "data": {"mode": "3d", "crop_size": [side, side, slices], "val_fraction": 0.34, "num_workers": 0},
        "backbone": {"name": tiny_segmenter_args["backbone"], "in_chans": tiny_segmenter_args["in_chans"],
                     "img_size": side, "options": dict(tiny_segmenter_args["backbone_options"])},
        "adapter": {"method": "med-tuning"},
        "model": {"decoder_options": {"channels": 16}},
        "train": {"max_steps": 3, "batch_size": 2, "eval_every": 2, "log_every": 1, "save_every": 2},
    }


@pytest.fixture(scope="session")
def tiny_pretrain_overrides() -> tuple[str, ...]:
    """``--set`` items that shrink ``configs/demo_pretrain.yaml`` to the 32 x 32 x 16
    ``synth_brats`` volumes: 32 px slices, batches of 4, 3 steps logged each step and saved
    at step 2, FreMAE band radius 3, 2 samples in the reconstruction figure."""
    return (
        "data.img_size=32", "backbone.img_size=32", "train.batch_size=4", "train.max_steps=3",
        "train.log_every=1", "train.save_every=2", "train.optim.lr=1e-3", "objective.radius=3",
        "figure_samples=2",
    )


# --------------------------------------------------------------------------- run folders made by hand

BRATS_DERIVED = {"label_values": [0, 1, 2, 4], "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}}


@pytest.fixture(scope="session")
def make_segmentation_run(tiny_segmenter_args):
    """``make_segmentation_run(folder, method, backbone=None, **adapter_options)``: a segmentation run
    folder as finetune writes it, of the tiny segmenter on crops of 2 slices (``backbone``:
    a pretrained backbone, a pretraining run folder), with randomised trained tensors."""
    import torch

    from medtune.checkpoints.params import segmentation_config
    from medtune.checkpoints.runs import RunConfig, write_run_config
    from medtune.config import to_dict
    from medtune.finetune.segmentation import build_segmenter
    from medtune.finetune.weights import save_base_backbone, save_trained

    def make(folder: Path, method: str, backbone: Path | None = None, **adapter_options) -> Path:
        cfg = segmentation_config(**{**tiny_segmenter_args, "slices": 2}, method=method)
        cfg.adapter.update(adapter_options)
        cfg.backbone.pretrained = str(backbone) if backbone is not None else None
        torch.manual_seed(0)
        model = build_segmenter(cfg, 4, load_pretrained=backbone is not None)
        folder.mkdir(parents=True, exist_ok=True)
        write_run_config(folder, RunConfig("segmentation", to_dict(cfg), BRATS_DERIVED))
        save_base_backbone(model, folder)  # when the run starts
        with torch.no_grad():  # make the trained tensors non-trivial (zero-init up-projections, ...)
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(0.01 * torch.randn_like(param))
        save_trained(model, folder, folder, "segmentation")
        return folder

    return make


@pytest.fixture(scope="session")
def make_pretrain_run():
    """``make_pretrain_run(folder, backbone_config)``: a pretraining run folder as ``medtune
    pretrain`` writes it (``config.json`` with task ``pretrain``, ``backbone.safetensors``,
    ``metrics.jsonl``), with random encoder weights; returns the folder."""
    import torch

    from medtune.checkpoints.io import save_safetensors
    from medtune.checkpoints.runs import RunConfig, write_run_config
    from medtune.config import to_dict
    from medtune.models import create_backbone

    def make(folder: Path, backbone_config) -> Path:
        torch.manual_seed(1)
        backbone = create_backbone(backbone_config)
        with torch.no_grad():
            for param in backbone.parameters():
                param.add_(0.02 * torch.randn_like(param))
        folder.mkdir(parents=True, exist_ok=True)
        config = {"data": {"root": "/data/BraTS2020/MICCAI_BraTS2020_TrainingData", "mode": "2d"},
                  "backbone": to_dict(backbone_config), "objective": {"name": "fremae", "mask_ratio": 0.25},
                  "train": {"max_steps": 3, "batch_size": 4, "optim": {"name": "adam", "lr": 5e-4}}}
        write_run_config(folder, RunConfig("pretrain", config))
        save_safetensors(backbone.state_dict(), folder / "backbone.safetensors")
        (folder / "metrics.jsonl").write_text('{"step": 3, "loss": 0.5}\n')
        return folder

    return make
