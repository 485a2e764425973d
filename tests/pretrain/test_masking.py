"""Masking strategies: exact fractions, foreground only, 2D and 3D through one code path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medtune.pretrain.masking import (
    block_masking,
    foreground_of,
    gather_patches,
    pixel_masking,
    random_masking,
    upsample_mask,
)
from medtune.pretrain.simmim import pixel_shuffle


def _image_with_foreground(shape, batch=3, modalities=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, modalities, *shape, generator=gen)
    foreground = torch.rand(batch, *shape, generator=gen) < torch.linspace(0.2, 0.8, batch).view(-1, *[1] * len(shape))
    image = image * foreground.unsqueeze(1)  # background exactly 0, as in BraTS
    return image, foreground


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 6)])
def test_pixel_masking_fraction_foreground_only_and_token(shape):
    image, foreground = _image_with_foreground(shape)
    assert torch.equal(foreground_of(image), foreground & (image != 0).all(1))
    token = torch.tensor([7.0, -3.0], requires_grad=True)
    masked, mask = pixel_masking(image, foreground, 0.25, token, jitter=0.0)
    assert mask.shape == foreground.shape and masked.shape == image.shape
    for b in range(image.shape[0]):
        assert int(mask[b].sum()) == math.floor(0.25 * int(foreground[b].sum()))
    assert not (mask & ~foreground).any()  # foreground only
    m = mask.unsqueeze(1).expand_as(image)
    assert torch.equal(masked[~m], image[~m])  # untouched elsewhere
    assert torch.equal(masked[:, 0][mask], torch.full((int(mask.sum()),), 7.0))
    assert torch.equal(masked[:, 1][mask], torch.full((int(mask.sum()),), -3.0))
    masked.sum().backward()
    assert torch.equal(token.grad, torch.full((2,), float(mask.sum())))


def test_pixel_masking_batch_scope_counts_over_the_batch():
    image, foreground = _image_with_foreground((16, 16))
    token = torch.zeros(2)
    _, mask = pixel_masking(image, foreground, 0.3, token, scope="batch", jitter=0.0)
    assert int(mask.sum()) == math.floor(0.3 * int(foreground.sum()))
    assert not (mask & ~foreground).any()


def test_pixel_masking_jitter_is_an_affine_map_per_sample_and_modality():
    image, foreground = _image_with_foreground((12, 12), batch=4)
    torch.manual_seed(1)
    masked, mask = pixel_masking(image, foreground, 0.25, torch.zeros(2), jitter=0.1)
    for b in range(4):
        for c in range(2):
            x = image[b, c][~mask[b]]
            y = masked[b, c][~mask[b]]
            design = torch.stack([x, torch.ones_like(x)], 1)
            scale, shift = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
            assert 0.9 <= float(scale) <= 1.1 and -0.1 <= float(shift) <= 0.1
            assert torch.allclose(design @ torch.stack([scale, shift]), y, atol=1e-5)


def test_random_masking_keeps_exact_count_and_restores_order():
    torch.manual_seed(0)
    pm = random_masking(4, 20, 0.75)
    assert pm.ids_keep.shape == (4, 5) and pm.ids_restore.shape == (4, 20)
    assert torch.equal(pm.mask.sum(1), torch.full((4,), 15.0))
    assert torch.equal(pm.mask.gather(1, pm.ids_keep), torch.zeros(4, 5))  # kept = visible
    tokens = torch.arange(20.0).view(1, 20, 1).expand(4, 20, 3)
    shuffled = gather_patches(tokens, pm.ids_restore.argsort(1))
    assert torch.equal(gather_patches(shuffled, pm.ids_restore), tokens)


@pytest.mark.parametrize("grid,block", [((8, 8), 2), ((4, 4, 4), 2), ((6, 5), 2)])
def test_block_masking_ratio_and_blocks(grid, block):
    torch.manual_seed(0)
    mask = block_masking(3, grid, 0.5, block)
    assert mask.shape == (3, *grid) and mask.dtype == torch.bool
    coarse = [math.ceil(g / block) for g in grid]
    if all(g % block == 0 for g in grid):
        per_sample = math.ceil(math.prod(coarse) * 0.5) * block ** len(grid)
        assert torch.equal(mask.flatten(1).sum(1), torch.full((3,), per_sample))
        # every block is all masked or all visible
        pool = (F.max_pool2d if len(grid) == 2 else F.max_pool3d)
        as_float = mask.float().unsqueeze(1)
        assert torch.equal(pool(as_float, block), -pool(-as_float, block))
    assert mask.any() and not mask.all()


def test_upsample_mask_and_pixel_shuffle_match_torch_2d():
    mask = torch.tensor([[[True, False], [False, True]]])
    up = upsample_mask(mask, 2)
    assert torch.equal(up[0], torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))
    x = torch.randn(2, 12, 3, 5)
    assert torch.equal(pixel_shuffle(x, 2, 2), F.pixel_shuffle(x, 2))
    # 3D: the value at output (c, g*r + i, h*r + j, w*r + k) is input channel c*r^3 + (i*r + j)*r + k
    x3 = torch.randn(1, 2 * 8, 2, 3, 4)
    y3 = pixel_shuffle(x3, 2, 3)
    assert y3.shape == (1, 2, 4, 6, 8)
    assert y3[0, 1, 2 * 1 + 1, 2 * 2 + 0, 2 * 3 + 1] == x3[0, 1 * 8 + (1 * 2 + 0) * 2 + 1, 1, 2, 3]
