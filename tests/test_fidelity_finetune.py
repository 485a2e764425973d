"""The PETL methods and the Med-Tuning recipe against their official code (docs/fidelity.md).

AdaptFormer (ShoufaChen/AdaptFormer ``models/adapter.py`` + ``custom_modules.Block``) and
ST-Adapter (linziyi96/st-adapter ``models_adapter.py``) are written out below from their
published equations, on the adapted timm block's own frozen modules and the adapter's
weights, and compared with what medtune computes. The Med-Tuning loss value was
computed once with the official ``softmax_dice`` (jessie-chen99/Med-Tuning-Official
``utils/criterions.py``) on :func:`dice_recipe` (float64, label values 0/1/2/4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from medtune.adapters import AdaptFormerConfig, MedTuningConfig, STAdapterConfig, apply_adapter, describe
from medtune.adapters.med_tuning import SliceFrequencyFilter, SliceIndexFilter
from medtune.errors import DataError
from medtune.models import BackboneConfig, create_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OFFICIAL_SOFTMAX_DICE = 2.2881765099969655  # Med-Tuning's softmax_dice on dice_recipe()


def vit():
    """One class token + 4 x 4 patches per 32 px slice, 4 blocks."""
    options = {"patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 2}
    return create_backbone(BackboneConfig(name="vit_tiny_patch16_224", in_chans=4, img_size=32, options=options))


def swin():
    options = {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 2, 3, 4), "window_size": 4}
    return create_backbone(BackboneConfig(name="swin_tiny_patch4_window7_224", in_chans=4, img_size=32, options=options))


def randomize(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def set_slices(backbone, num_slices: int, grid: tuple[int, int] | None = None) -> None:
    ctx = backbone.medtune_adapter.slice_context
    ctx.num_slices = num_slices
    if grid is not None:
        ctx.token_grid = grid


def attention_sublayer(block, x: torch.Tensor, family: str) -> torch.Tensor:
    """``x + attn(norm1(x))`` of a timm block (eval: drop-path and layer scale are identities)."""
    if family == "swin":
        return x + block._attn(block.norm1(x))
    return x + block.ls1(block.attn(block.norm1(x)))


# --------------------------------------------------------------------------- AdaptFormer


def official_adaptformer_block(block, x: torch.Tensor, adapter, family: str, layer_norm: str) -> torch.Tensor:
    """AdaptFormer's ``Block.forward`` with ``ffn_option="parallel"``: the adapter reads the
    residual stream after attention, ``adapt = s * up(ReLU(down(LN?(x))))``, added to the MLP branch."""
    x = attention_sublayer(block, x, family)
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-1])  # Swin's MLP runs on (B, H*W, C)
    u = F.layer_norm(x, x.shape[-1:], adapter.norm.weight, adapter.norm.bias, adapter.norm.eps) if layer_norm == "in" else x
    adapt = F.linear(torch.relu(F.linear(u, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias) * 0.1
    out = x + block.mlp(block.norm2(x)) + adapt
    return out.reshape(shape)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("layer_norm", ["none", "in"])
def test_adaptformer_is_the_published_parallel_adapter(family, layer_norm):
    cfg = AdaptFormerConfig(bottleneck=8, layer_norm=layer_norm)
    assert (AdaptFormerConfig().bottleneck, AdaptFormerConfig().scale, AdaptFormerConfig().dropout) == (64, 0.1, 0.1)
    assert AdaptFormerConfig().layer_norm == "none"  # the official recipes' adapter_layernorm_option
    torch.manual_seed(0)
    backbone = apply_adapter({"vit": vit, "swin": swin}[family](), cfg).eval()
    block = (backbone.model.blocks if family == "vit" else backbone.model.layers[0].blocks)[0]
    adapter = block.adaptformer
    # the official "lora" init: down weight random, down bias and up zero (the adapted model starts frozen)
    assert adapter.down.weight.abs().sum() > 0 and adapter.dropout.p == 0.1
    assert not adapter.down.bias.any() and not adapter.up.weight.any() and not adapter.up.bias.any()
    assert (adapter.norm is not None) == (layer_norm == "in")
    if layer_norm == "in":  # a new, trainable LayerNorm (not the frozen norm2)
        assert adapter.norm is not block.norm2 and adapter.norm.weight.requires_grad
    randomize(adapter)
    x = torch.randn(6, 17, 48) if family == "vit" else torch.randn(6, 8, 8, 24)
    with torch.no_grad():
        assert torch.allclose(block(x), official_adaptformer_block(block, x, adapter, family, layer_norm), atol=1e-5)
    assert describe(backbone)["groups"]["adapter"] == sum(
        p.numel() for name, p in backbone.named_parameters() if ".adaptformer." in name
    )


# --------------------------------------------------------------------------- ST-Adapter


def official_st_adapter(adapter, x: torch.Tensor, num_slices: int) -> torch.Tensor:
    """ST-Adapter's ``Adapter.forward``: class token kept, ``fc1`` -> depthwise (3,1,1) conv over
    (T, H, W) -> ``fc2`` added to the patch tokens."""
    bt, length, _ = x.shape
    side = round((length - 1) ** 0.5)
    h = F.linear(x[:, 1:], adapter.down.weight, adapter.down.bias)  # (BT, L-1, Ca)
    h = h.view(bt // num_slices, num_slices, side, side, -1).permute(0, 4, 1, 2, 3)  # (B, Ca, T, H, W)
    conv = adapter.slice_conv
    h = F.conv3d(h, conv.weight, conv.bias, padding=(1, 0, 0), groups=conv.groups)
    h = h.permute(0, 2, 3, 4, 1).reshape(bt, length - 1, -1)
    update = F.linear(h, adapter.up.weight, adapter.up.bias)
    return torch.cat([x[:, :1], x[:, 1:] + update], dim=1)


@pytest.mark.parametrize("placement", ["mlp", "attn+mlp"])
def test_st_adapter_is_the_published_adapter_and_placement(placement):
    """Official ResidualAttentionBlock: ``adapter_pre_attn`` (24x384 only), attention,
    ``adapter_pre_mlp``, MLP; the depthwise conv starts at zero."""
    assert STAdapterConfig().placement == "mlp" and STAdapterConfig().width_ratio == 0.5  # 12x384 on ViT-B
    torch.manual_seed(0)
    backbone = apply_adapter(vit(), STAdapterConfig(placement=placement)).eval()
    block = backbone.model.blocks[1]
    sites = {"mlp": ["mlp"], "attn+mlp": ["attn", "mlp"]}[placement]
    assert sorted(block.st_adapter) == sorted(sites)
    for adapter in block.st_adapter.values():
        conv = adapter.slice_conv
        assert not conv.weight.any() and not conv.bias.any()  # zero-initialised as the official code
        assert not adapter.down.bias.any() and not adapter.up.bias.any()
        assert adapter.down.weight.abs().sum() > 0 and adapter.up.weight.abs().sum() > 0
        assert conv.kernel_size == (3, 1, 1) and conv.groups == adapter.down.out_features == 24
        randomize(adapter)
    set_slices(backbone, 3, (4, 4))
    x = torch.randn(6, 17, 48)  # 2 volumes x 3 slices, class token + 4 x 4 patches
    with torch.no_grad():
        expected = x
        if "attn" in sites:
            expected = official_st_adapter(block.st_adapter["attn"], expected, 3)
        expected = attention_sublayer(block, expected, "vit")
        expected = official_st_adapter(block.st_adapter["mlp"], expected, 3)
        expected = expected + block.ls2(block.mlp(block.norm2(expected)))
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_st_adapter_before_the_mlp_on_swin_mixes_slices():
    torch.manual_seed(0)
    backbone = apply_adapter(swin(), STAdapterConfig()).eval()
    block = backbone.model.layers[0].blocks[0]
    adapter = block.st_adapter["mlp"]
    randomize(adapter)
    set_slices(backbone, 3)
    x = torch.randn(6, 8, 8, 24)
    with torch.no_grad():
        mid = attention_sublayer(block, x, "swin")  # (B*T, H, W, C)
        h = adapter.down(mid).reshape(2, 3, 8, 8, -1).permute(0, 4, 1, 2, 3)
        conv = adapter.slice_conv
        h = F.conv3d(h, conv.weight, conv.bias, padding=(1, 0, 0), groups=conv.groups)
        mid = mid + adapter.up(h.permute(0, 2, 3, 4, 1).reshape(6, 8, 8, -1))
        flat = mid.reshape(6, 64, 24)
        expected = (flat + block.mlp(block.norm2(flat))).reshape(6, 8, 8, 24)
        assert torch.allclose(block(x), expected, atol=1e-5)
