"""Whole 3D networks (TransBTSV2, CGA U-Net, MONAI's UNETR/SwinUNETR): any crop size,
learning on generated volumes, weights that reload exactly."""

from __future__ import annotations

import pytest
import torch

from medtune.errors import ConfigError, DataError
from medtune.models.networks import NetworkConfig, create_network


@pytest.fixture
def tiny_network(tiny_transbtsv2_options, tiny_cga_options):
    """``tiny_network(name, crop=(16, 16, 16))``: a seeded tiny network for 4 classes."""
    options = {"transbtsv2": tiny_transbtsv2_options, "cga_unet": tiny_cga_options}

    def build(name: str, crop=(16, 16, 16)):
        torch.manual_seed(0)
        return create_network(NetworkConfig(name, 4, options[name]), 4, crop)

    return build


@pytest.mark.parametrize("name", ["transbtsv2", "cga_unet"])
def test_logits_have_the_input_size_for_even_and_odd_crops(name, tiny_network):
    net = tiny_network(name).eval()
    assert net.size_divisor == 8
    with torch.no_grad():
        for size in [(16, 16, 16), (17, 12, 9)]:  # odd sides are padded to 24, 16, 16 and cropped back
            assert net(torch.randn(1, 4, *size)).shape == (1, 4, *size)
        outputs = net.forward_outputs(torch.randn(1, 4, 16, 16, 8))
    assert outputs["embedding"].shape == (1, net.embedding_channels, 16, 16, 8)
    assert set(outputs) == set(net.outputs)


@pytest.mark.parametrize("name", ["transbtsv2", "cga_unet"])
def test_a_few_training_steps_lower_the_loss(name, tiny_network, generated_batch):
    from medtune.finetune.segment3d.model import NetworkSegmenter
    from medtune.models.losses import LossContext, build_criterion

    net = tiny_network(name)
    context = LossContext(4, 3, net.embedding_channels, net.outputs)
    model = NetworkSegmenter(net, build_criterion({"dice_ce": 1.0}, context, auxiliary=net.auxiliary_losses)).train()
    assert set(model.criterion.terms) == {"dice_ce", *net.auxiliary_losses}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = model(generated_batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["transbtsv2", "cga_unet"])
def test_saved_weights_reload_to_the_same_outputs(name, tiny_network, tmp_path):
    from medtune.checkpoints.io import load_state, load_weights, save_safetensors

    net = tiny_network(name).eval()
    save_safetensors(net.state_dict(), tmp_path / "net.safetensors")
    torch.manual_seed(1)
    other = tiny_network(name)
    for param in other.parameters():  # other weights than the saved ones
        torch.nn.init.normal_(param)
    load_state(other.eval(), load_weights(tmp_path / "net.safetensors"), strict=True)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))


def test_transbtsv2_resamples_its_position_embedding_for_another_token_grid(tiny_network):
    net = tiny_network("transbtsv2", crop=(20, 16, 9)).eval()  # padded to 24, 16, 16: a 3 x 2 x 2 grid
    assert net.position.shape[2:] == (3, 2, 2)
    assert net.position_embedding((3, 2, 2)).shape == (1, 12, 8)
    assert torch.equal(net.position_embedding((3, 2, 2))[0], net.position[0].flatten(1).T)
    with torch.no_grad():
        assert net(torch.randn(1, 4, 32, 8, 8)).shape == (1, 4, 32, 8, 8)  # a 4 x 1 x 1 grid: resampled
    dbms = [type(m).__name__ for m in net.skip_refine]
    assert dbms == ["Identity", "DeformableBottleneck", "DeformableBottleneck"]  # skips at strides 2 and 4


def test_network_options_are_checked_by_key(tiny_transbtsv2_options):
    bad = {**tiny_transbtsv2_options, "num_heads": 3}  # attention width 16 is not divisible by 3
    with pytest.raises(ConfigError, match="model.options.*num_heads 3"):
        create_network(NetworkConfig("transbtsv2", 4, bad), 4, (16, 16, 16))
    with pytest.raises(ConfigError, match="model.options.depthh"):
        create_network(NetworkConfig("cga_unet", 4, {"depthh": 2}), 4, (16, 16, 16))
    with pytest.raises(ConfigError, match="unknown network 'transbts'"):
        create_network(NetworkConfig("transbts"), 4, (16, 16, 16))


def test_monai_baselines_give_their_last_decoder_map_and_refuse_sizes_they_cannot_take():
    tiny = {"feature_size": 4, "hidden_size": 8, "mlp_dim": 8, "num_heads": 2}
    unetr = create_network(NetworkConfig("unetr", 4, tiny), 3, (17, 16, 16)).eval()  # built for 32 x 16 x 16
    with torch.no_grad():
        outputs = unetr.forward_outputs(torch.randn(1, 4, 32, 16, 16))
        assert unetr(torch.randn(1, 4, 20, 16, 16)).shape == (1, 3, 20, 16, 16)
    assert outputs["embedding"].shape == (1, 4, 32, 16, 16)
    with pytest.raises(DataError, match=r"built for inputs of \[32, 16, 16\] voxels; got \[16, 16, 16\]"):
        unetr(torch.randn(1, 4, 16, 16, 16))
    with pytest.raises(ConfigError, match=r"crop size \[32, 32, 32\] is too small"):
        create_network(NetworkConfig("swinunetr"), 3, (32, 32, 32))
