"""The AGLN decoder: Context Fusion Blocks at init, in 2D and 3D, and the official code's numbers."""

from __future__ import annotations

import pytest
import torch

from medtune.errors import ConfigError
from medtune.models.agln import AGLNDecoder, ContextFusionBlock, SemanticAggregation
from medtune.models.decoders import create_decoder


def fill(module: torch.nn.Module, seed: int) -> None:
    """Every parameter, in registration order, from N(0, 0.2^2) of a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_fresh_cfb_passes_the_decoder_feature_through_to_its_conv_norm_relu(spatial_dims):
    block = ContextFusionBlock(spatial_dims, 8, 2, "batch").eval()
    assert (block.alpha.item(), block.beta.item(), block.gamma.item()) == (0.0, 1.0, 0.0)
    size = (5, 4, 3)[:spatial_dims]
    encoder, decoder = torch.randn(2, 8, *size), torch.randn(2, 8, *size)
    descriptors = SemanticAggregation(spatial_dims, 8, 8, 2)(torch.randn(2, 8, *size))
    with torch.no_grad():
        assert torch.allclose(block(encoder, decoder, descriptors), block.fuse(decoder + encoder), atol=1e-6)


def test_official_numbers_of_a_context_fusion_block():
    """Numbers of the official CFB and SAB (zhasen1996/AGLN, encoding/models/sseg/agln.py) with
    these weights (mixing weights alpha, beta, gamma drawn too, so every branch counts)."""
    block, aggregate = ContextFusionBlock(2, 8, 2, "batch").eval(), SemanticAggregation(2, 8, 8, 2).eval()
    fill(block, 0)
    fill(aggregate, 1)
    g = torch.Generator().manual_seed(2)
    encoder, decoder, deeper = (torch.randn(2, 8, 6, 5, generator=g) for _ in range(3))
    with torch.no_grad():
        out = block(encoder, decoder, aggregate(deeper))
    assert abs(out.sum().item() - 53.999359130859375) < 1e-3
    official = [0.0, 0.09544189, 0.0, 0.18702835, 0.06482814, 0.22652416, 0.08446547, 0.0]
    assert torch.allclose(out[0, :, 2, 3], torch.tensor(official), atol=1e-5)


def test_official_numbers_of_the_whole_head():
    """The official AGLNHead (four levels, 8 channels, 2 descriptors, 512-wide fusion,
    align_corners=True) with these weights: logits at the shallowest level's size."""
    decoder = AGLNDecoder((4, 8, 12, 16), (4, 8, 16, 32), 3, 2, channels=8, descriptors=2, fuse_channels=512).eval()
    fill(decoder, 3)
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, c, 32 // s, 40 // s, generator=g) for c, s in zip((4, 8, 12, 16), (4, 8, 16, 32))]
    with torch.no_grad():
        logits = decoder.forward_head(decoder.forward_decoder(features), (8, 10))
    assert abs(logits.sum().item() - (-62.24250793457031)) < 1e-3
    assert abs(logits.abs().sum().item() - 85.96263885498047) < 1e-3
    assert torch.allclose(logits[1, :, 3, 4], torch.tensor([-0.19552705, 0.02130067, -0.19962001]), atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_agln_decodes_hierarchical_features_in_2d_and_3d(spatial_dims):
    channels, strides = (4, 8, 8, 16), (2, 4, 8, 16)
    size = (16,) * spatial_dims
    features = [torch.randn(2, c, *(n // s for n in size)) for c, s in zip(channels, strides)]
    decoder = create_decoder("agln", channels, strides, 3, spatial_dims, channels=8)
    assert [len(level) for level in decoder.fusion] == [3, 2, 1]  # one CFB per deeper descriptor set
    logits = decoder(features, size)
    assert logits.shape == (2, 3, *size)
    logits.sum().backward()
    assert decoder.fusion[0][0].distribute.weights.weight.grad is not None
    with pytest.raises(ConfigError, match="hierarchical backbone"):
        create_decoder("agln", (8,) * 4, (16,) * 4, 3)  # a plain ViT's equal strides
