"""Masked-input self-distillation plug-in for volumetric segmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medtune.errors import ConfigError
from medtune.finetune.self_distill import (
    SelfDistillation,
    SelfDistillConfig,
    distill_loss,
    mask_slices_or_patches,
)


def test_slice_mask_hits_whole_slices_at_ratio():
    volume = torch.randn(3, 2, 8, 6, 20) + 5.0  # nothing is 0 before masking
    gen = torch.Generator().manual_seed(0)
    masked, mask = mask_slices_or_patches(volume, 0.25, mode="slices", fill_value=0.0, generator=gen)
    assert mask.shape == (3, 8, 6, 20) and mask.dtype == torch.bool
    per_slice = mask.all(dim=(1, 2))  # [B, D]: a slice is masked entirely or not at all
    assert torch.equal(per_slice, mask.any(dim=(1, 2)))
    assert per_slice.sum(dim=1).tolist() == [5, 5, 5]  # round(0.25 * 20)
    assert torch.equal(masked == 0.0, mask.unsqueeze(1).expand_as(volume))
    assert torch.equal(masked[~mask.unsqueeze(1).expand_as(volume)], volume[~mask.unsqueeze(1).expand_as(volume)])
    assert volume.min() > 0  # input untouched
    assert not torch.equal(per_slice[0], per_slice[1]) or not torch.equal(per_slice[1], per_slice[2])


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 8), (20, 12, 10)])
def test_patch_mask_ratio_and_grid(spatial):
    volume = torch.ones(2, 1, *spatial)
    patch = 4
    _, mask = mask_slices_or_patches(volume, 0.5, mode="patches", patch_size=patch)
    assert mask.shape == (2, *spatial)
    grid = [-(-s // patch) for s in spatial]
    num_patches = 1
    for g in grid:
        num_patches *= g
    # Each patch is either fully masked or not: pool to the grid and check 0/1 values.
    pooled = nn.functional.max_pool2d if len(spatial) == 2 else nn.functional.max_pool3d
    any_masked = pooled(mask.float().unsqueeze(1), patch, ceil_mode=True)
    all_masked = -pooled(-mask.float().unsqueeze(1), patch, ceil_mode=True)
    assert torch.equal(any_masked, all_masked)
    assert any_masked.flatten(1).sum(1).tolist() == [round(0.5 * num_patches)] * 2


def test_slices_need_3d_and_ratio_is_checked():
    with pytest.raises(ConfigError):
        mask_slices_or_patches(torch.zeros(1, 1, 8, 8), 0.3, mode="slices")
    with pytest.raises(ConfigError):
        mask_slices_or_patches(torch.zeros(1, 1, 8, 8, 8), 1.0, mode="slices")
    with pytest.raises(ValueError):
        SelfDistillConfig(kind="l1")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kind", ["kl", "bce", "mse"])
def test_distill_loss_zero_on_agreement_and_stop_gradient(kind, activation):
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 5, 4, 3, requires_grad=True)
    same = teacher.detach().clone().requires_grad_(True)
    zero = distill_loss(same, teacher, kind, activation)
    assert abs(zero.item()) < 1e-6
    student = torch.randn(2, 3, 5, 4, 3, requires_grad=True)
    loss = distill_loss(student, teacher, kind, activation)
    assert loss.item() > 1e-3
    loss.backward()
    assert teacher.grad is None  # stop-gradient: nothing flows into the teacher
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_distill_loss_hand_worked_binary_kl():
    # p_t = 0.5, p_s = sigmoid(log 3) = 0.75: KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
    student = torch.full((1, 1, 1), float(torch.log(torch.tensor(3.0))))
    teacher = torch.zeros(1, 1, 1)
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.75)) + 0.5 * torch.log(torch.tensor(2.0))
    assert torch.allclose(distill_loss(student, teacher, "bce", "sigmoid"), expected, atol=1e-6)


def test_self_distillation_wrapper_adds_no_parameters_and_detaches_teacher():
    torch.manual_seed(0)
    model = nn.Conv3d(2, 3, 3, padding=1)
    n_params = sum(p.numel() for p in model.parameters())
    sd = SelfDistillation(SelfDistillConfig(ratio=0.5, mode="slices", weight=2.0))
    x = torch.randn(2, 2, 8, 8, 6)
    logits = model(x)
    term = sd(model, x, logits)
    assert term.item() > 0
    # gradient of the term reaches the weights only through the masked (student) branch
    grads = torch.autograd.grad(term, [logits, model.weight], allow_unused=True)
    assert grads[0] is None and grads[1] is not None
    assert sum(p.numel() for p in model.parameters()) == n_params
    model.eval()
    assert sd(model, x, logits).item() == 0.0
