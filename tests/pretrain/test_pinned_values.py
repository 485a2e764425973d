"""FreMAE's loss and gradients on fixed seeds, pinned as numbers: a change that is meant to
be speed only (real FFTs, half spectra, fused band masks, layouts) must leave them equal
(1e-5 relative). A change of the math updates the numbers in the same commit, saying why."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medtune.models import BackboneConfig, create_backbone
from medtune.pretrain import FreMAEConfig, MFMConfig, build_objective
from tests.pretrain.test_objectives import blobs

# case -> (loss, loss_high, loss_low, norm of all gradients, norm of the high global filter's
# weight gradient): measured at commit 1d7f622, before the speed work of issue 16.
PINNED = {
    "vit-2d-square": (1.959800362586975, 0.07222988456487656, 1.4519773721694946, 25.79854965209961, 0.0035831378772854805),
    "vit-2d-official-r3": (1.5388118028640747, 0.14911599457263947, 1.068996787071228, 14.038263320922852, 0.0061708237044513226),
    "vit-2d-circle-r5": (1.6103148460388184, 0.1412767767906189, 1.130029320716858, 14.355579376220703, 0.0060961185954511166),
    "vit-2d-patch": (0.45548349618911743, 0.07672357559204102, 0.2913537919521332, 38.543212890625, 0.006321932189166546),
    "swin-3d-square-r2": (0.23339015245437622, 0.08839914202690125, 0.11153154820203781, 3.7571163177490234, 0.0065733036026358604),
    "vit-2d-mfm": (0.5415968894958496, 0.5415968894958496, 0.5415968894958496, 1.0423709154129028, 0.0),
}


def _vit(tiny_vit_config, img_size: int = 32):
    return create_backbone(dataclasses.replace(tiny_vit_config, in_chans=2, img_size=img_size))


def _swinunetr(tiny_swinunetr_options, spatial_dims: int, img_size: int):
    options = dict(tiny_swinunetr_options, window_size=4, patch_size=2)
    return create_backbone(BackboneConfig("swinunetr", 2, img_size, spatial_dims, options=options))


CASES = {
    "vit-2d-square": (lambda f: _vit(f["vit"]), FreMAEConfig(), (32, 32)),
    "vit-2d-official-r3": (lambda f: _vit(f["vit"], 64), FreMAEConfig(filter_kind="square_official", radius=3), (64, 64)),
    "vit-2d-circle-r5": (lambda f: _vit(f["vit"], 64), FreMAEConfig(filter_kind="circle", radius=5), (64, 64)),
    "vit-2d-patch": (lambda f: _vit(f["vit"]), FreMAEConfig(mask_mode="patch", radius=4, focal_alpha=2.0), (32, 32)),
    "swin-3d-square-r2": (lambda f: _swinunetr(f["swin"], 3, 32), FreMAEConfig(radius=2), (32, 32, 32)),
    "vit-2d-mfm": (lambda f: _vit(f["vit"]), MFMConfig(), (32, 32)),
}


def measure(case: str, fixtures: dict) -> tuple[float, ...]:
    build, cfg, shape = CASES[case]
    torch.manual_seed(0)
    objective = build_objective(cfg, build(fixtures)).train()
    data = blobs(2, shape)
    torch.manual_seed(1)
    out = objective(data)
    out["loss"].backward()
    grads = [p.grad.flatten() for p in objective.parameters() if p.grad is not None]
    loss = out["loss"].detach()
    values = [float(loss), float(out.get("loss_high", loss)), float(out.get("loss_low", loss)),
              float(torch.cat(grads).norm())]
    high_filter = getattr(getattr(objective, "decoder", None), "high_filter", None)
    values.append(float(high_filter.weight.grad.norm()) if high_filter is not None else 0.0)
    return tuple(values)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_are_pinned(case, tiny_vit_config, tiny_swinunetr_options):
    values = measure(case, {"vit": tiny_vit_config, "swin": tiny_swinunetr_options})
    assert values == pytest.approx(PINNED[case], rel=1e-5), f"{case}: {values}"
