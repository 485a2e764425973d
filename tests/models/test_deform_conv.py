"""Deformable convolution: an ordinary convolution at zero offsets, torchvision's in 2D."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medtune.models.deform_conv import DeformConv, deform_conv


def test_zero_offsets_give_the_ordinary_3d_convolution_of_the_same_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, 5, generator=g)
    weight, bias = torch.randn(4, 3, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    offset = torch.zeros(2, 27 * 3, 7, 6, 5)
    assert torch.allclose(deform_conv(x, offset, weight, bias, padding=1), F.conv3d(x, weight, bias, padding=1), atol=1e-5)
    dilated = deform_conv(x, offset, weight, bias, padding=2, dilation=2)
    assert torch.allclose(dilated, F.conv3d(x, weight, bias, padding=2, dilation=2), atol=1e-5)


def test_2d_equals_torchvision_deform_conv2d_at_random_offsets():
    from torchvision.ops import deform_conv2d

    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 3, 9, 7, generator=g), torch.randn(5, 3, 3, 3, generator=g)
    offset = 2.5 * torch.randn(2, 18, 9, 7, generator=g)  # many samples fall between and outside voxels
    assert torch.allclose(deform_conv(x, offset, weight, padding=1), deform_conv2d(x, offset, weight, padding=(1, 1)),
                          atol=1e-5)


def test_a_whole_voxel_offset_reads_the_neighbour():
    x = torch.arange(5.0).reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2).contiguous()
    weight = torch.zeros(1, 1, 3, 3, 3)
    weight[0, 0, 1, 1, 1] = 1.0  # the identity kernel: reads the centre point only
    offset = torch.zeros(1, 27 * 3, 5, 2, 2)
    offset[:, 13 * 3] = 1.0  # the centre point moves one voxel along the first axis
    out = deform_conv(x, offset, weight)
    assert torch.equal(out[0, 0, :, 0, 0], torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0]))  # zero beyond the edge


def test_the_layer_starts_as_a_convolution_and_learns_its_offsets():
    torch.manual_seed(0)
    layer = DeformConv(3, 2, 3)
    x = torch.randn(1, 2, 5, 5, 4)
    assert torch.allclose(layer(x), F.conv3d(x, layer.weight, layer.bias, padding=1), atol=1e-5)
    layer(x).square().sum().backward()
    assert layer.offset.weight.grad is not None and layer.offset.weight.grad.abs().sum() > 0
