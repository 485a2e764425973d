"""The math of Med-DANet: Gumbel straight-through choices, weight quantization, crop and paste,
per-slice bit widths, and the counted cost of each path."""

from __future__ import annotations

import pytest
import torch

from medtune.finetune.dynamic.layers import (
    BitSelector,
    crop_slices,
    image_gradient_stats,
    paste_probabilities,
    quantize_weight,
    run_at_bits,
    straight_through_choice,
)


def test_the_gumbel_choice_is_one_hot_forward_and_its_gradient_reaches_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(64, 3, requires_grad=True)
    choice = straight_through_choice(logits, tau=1.0, sample=True)
    assert torch.equal(choice.sum(1), torch.ones(64)) and set(choice.unique().tolist()) == {0.0, 1.0}
    (choice * torch.tensor([0.0, 1.0, 2.0])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # the expected cost falls if the logits follow the gradient: the cheapest choice gains
    assert (logits.grad[:, 0] < 0).float().mean() > 0.9
    picked = straight_through_choice(logits.detach(), sample=False)
    assert torch.equal(picked.argmax(1), logits.detach().argmax(1))


def test_sampled_choices_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]])).expand(20000, 3)
    frequency = straight_through_choice(logits, sample=True).mean(0)
    assert torch.allclose(frequency, torch.tensor([0.2, 0.3, 0.5]), atol=0.015)


@pytest.mark.parametrize("bits,bound", [(16, 2 ** 15 - 1), (8, 127)])
def test_quantized_weights_are_within_a_step_and_the_round_is_straight_through(bits, bound):
    torch.manual_seed(0)
    weight = torch.randn(32, 16, 3, 3, requires_grad=True)
    quantized = quantize_weight(weight, bits)
    step = weight.detach().abs().max() / bound
    assert (quantized - weight).abs().max() <= step / 2 + 1e-7
    levels = torch.round(quantized.detach() / step)
    assert torch.allclose(quantized.detach(), levels * step, atol=1e-6)  # on the grid
    assert levels.abs().max() == bound  # the largest weight is the top level
    if bits == 8:
        assert len(levels.unique()) <= 2 * bound + 1
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight-through
    assert quantize_weight(weight, 32) is weight


def test_a_centred_crop_through_an_identity_segmenter_lands_where_it_was_taken():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48)
    position = torch.full((2, 2), 0.5)
    crops = crop_slices(x, position, 32)  # origin (16, 8): the centre
    assert crops.shape == (2, 3, 32, 32)
    assert torch.allclose(crops, x[:, :, 16:48, 8:40], atol=1e-5)
    canvas = paste_probabilities(crops, position, (64, 48))  # the identity segmenter's "probabilities"
    assert torch.allclose(canvas[:, :, 16:48, 8:40], x[:, :, 16:48, 8:40], atol=1e-5)
    outside = torch.ones(64, 48, dtype=torch.bool)
    outside[16:48, 8:40] = False
    assert torch.allclose(canvas[:, 0][:, outside], torch.ones(1), atol=1e-5)  # background outside
    assert canvas[:, 1:][:, :, outside].abs().max() < 1e-5


def test_crops_at_the_corners_and_gradients_reach_the_position():
    x = torch.arange(2 * 1 * 40 * 40, dtype=torch.float32).reshape(2, 1, 40, 40)
    position = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    crops = crop_slices(x, position, 16)
    assert torch.allclose(crops[0], x[0, :, :16, :16]) and torch.allclose(crops[1], x[1, :, 24:, 24:])
    crops.sum().backward()
    assert position.grad.abs().sum() > 0


def test_a_crop_larger_than_the_slice_is_refused():
    from medtune.errors import DataError

    with pytest.raises(DataError, match="smaller than the 48 px crop"):
        crop_slices(torch.zeros(1, 1, 40, 64), torch.zeros(1, 2), 48)


def test_image_gradient_statistics_by_hand():
    ramp = torch.arange(8, dtype=torch.float32).repeat(8, 1)  # x increases by 1 per pixel, y constant
    stats = image_gradient_stats(ramp[None, None])
    # normalised Sobel (/8) of a unit ramp: (1 + 2 + 1) x 2 / 8 = 1 inside, the replicated border halves it
    assert stats[0, 0] == 0 and torch.isclose(stats[0, 1], torch.tensor((6 * 1.0 + 2 * 0.5) / 8))


def test_per_slice_bits_in_eval_equal_each_slice_run_alone():
    torch.manual_seed(0)
    stage = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))
    x = torch.randn(5, 3, 8, 8)
    choice = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 1]), 2).float()
    grouped = run_at_bits(stage, x, choice, (8, 16), mix=False)
    mixed = run_at_bits(stage, x, choice, (8, 16), mix=True)
    for i, bits in enumerate([8, 16, 16, 8, 16]):
        alone = run_at_bits(stage, x[i:i + 1], torch.nn.functional.one_hot(torch.tensor([int(bits == 16)]), 2).float(),
                            (8, 16), mix=False)
        assert torch.allclose(grouped[i], alone[0], atol=1e-6) and torch.allclose(mixed[i], alone[0], atol=1e-6)
    assert not torch.allclose(grouped[0], stage(x)[0], atol=1e-4)  # 8 bits differ from float
    assert torch.allclose(grouped[1], stage(x)[1], atol=1e-3)  # 16 bits nearly do not


def test_the_bit_selector_starts_at_the_widest_width_and_learns_from_its_cost():
    selector = BitSelector(4, 2, (8, 16))
    features, stats = torch.rand(6, 4, 8, 8), torch.rand(6, 4)
    choice, bits = selector(features, stats)
    assert torch.equal(bits, torch.full((6,), 16.0))
    bits.sum().backward()  # a cost on the bits: the gradient pushes towards 8
    assert selector.linear.bias.grad[1] > 0 > selector.linear.bias.grad[0]
