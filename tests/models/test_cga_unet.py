"""CGA U-Net's category-guided pieces, by hand and against the official code's numbers."""

from __future__ import annotations

import torch

from medtune.models.cga_unet import (
    class_centres,
    downsampled_one_hot,
    hard_assignment,
    inter_class_distance,
    inter_class_loss,
    intra_class_update,
)


def test_intra_class_update_with_a_single_class_adds_its_mean_everywhere():
    features = torch.randn(2, 5, 3, 4, 2)
    assignment = torch.zeros(2, 4, 3, 4, 2)
    assignment[:, 2] = 1.0  # every voxel is class 2
    centres = class_centres(features, assignment)
    mean = features.mean((2, 3, 4))  # (B, C)
    assert torch.allclose(centres[:, 2], mean * 24 / (24 + 1e-5), atol=1e-6)
    assert torch.equal(centres[:, [0, 1, 3]], torch.zeros(2, 3, 5))  # classes without voxels: 0, not NaN
    updated = intra_class_update(features, assignment, centres)
    assert torch.allclose(updated - features, centres[:, 2, :, None, None, None].expand_as(features), atol=1e-6)


def test_a_missing_class_gives_finite_centres_distance_loss_and_gradients():
    features = torch.randn(1, 6, 2, 2, 2, requires_grad=True)
    assignment = torch.zeros(1, 4, 2, 2, 2)
    assignment[:, 0] = 1.0  # one class present, three missing
    centres = class_centres(features, assignment)
    loss = inter_class_loss(inter_class_distance(centres))
    loss.backward()
    assert torch.isfinite(centres).all() and torch.isfinite(loss) and torch.isfinite(features.grad).all()
    same = torch.zeros(1, 4, 6, requires_grad=True)  # every centre equal: D = 0
    loss = inter_class_loss(inter_class_distance(same))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()


def test_official_numbers_of_the_category_guided_update():
    """Numbers of the official ``both()`` (delugewalker/CGA-U-Net, models/Unet_Both.py, run on
    the CPU with ``.cuda()`` as a no-op) on this recipe: the intra-class update's sum, the
    centres' spread D and the inter-class loss 10 log(100 / D + 1) of train_both.py."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 3, 4, 2, generator=g)
    attention = torch.randn(2, 4, 3, 4, 2, generator=g)
    attention[1, 3] -= 10  # class 3 never wins in sample 1: an empty class
    assignment = hard_assignment(attention)
    centres = class_centres(features, assignment)
    update = intra_class_update(features, assignment, centres) - features
    distance = inter_class_distance(centres)
    assert abs(update.sum().item() - 5.540396213531494) < 1e-4
    assert abs(distance.item() - 9.109600067138672) < 1e-4
    assert abs(inter_class_loss(distance).item() - 24.830242156982422) < 1e-4


def test_the_attention_target_is_the_nearest_downsampled_one_hot_label():
    label = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    label[0, 8:, :, :] = 3  # the far half of the first axis is class 3
    target = downsampled_one_hot(label, 4, (2, 2, 1))
    assert target.shape == (1, 4, 2, 2, 1)
    assert torch.equal(target[0, 0, :, :, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(target[0, 3, :, :, 0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(target.sum(1), torch.ones(1, 2, 2, 1))


def test_cga_losses_are_weighted_by_the_registry_with_the_official_defaults(tiny_cga_options):
    from medtune.models.losses import LossContext, build_criterion
    from medtune.models.networks import NetworkConfig, create_network

    net = create_network(NetworkConfig("cga_unet", 4, tiny_cga_options), 4, (16, 16, 16))
    assert dict(net.auxiliary_losses) == {"cga_sam": 20.0, "cga_inter_class": 1.0}
    context = LossContext(4, 3, net.embedding_channels, net.outputs)
    criterion = build_criterion({"dice_ce": 1.0, "cga_inter_class": 0}, context, auxiliary=net.auxiliary_losses)
    assert criterion.weights == {"dice_ce": 1.0, "cga_sam": 20.0}  # a configured 0 switches a term off
    outputs = net.forward_outputs(torch.randn(1, 4, 16, 16, 16))
    label = torch.randint(0, 4, (1, 16, 16, 16))
    out = criterion(outputs, label)
    expected = out["dice_ce"] + 20 * torch.nn.functional.mse_loss(outputs["sam_logits"], downsampled_one_hot(label, 4, (2, 2, 2)))
    assert torch.allclose(out["loss"], expected, atol=1e-5)
