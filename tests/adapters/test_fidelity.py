"""The PETL methods and the Med-Tuning recipe against their official code (docs/fidelity.md).

AdaptFormer (ShoufaChen/AdaptFormer ``models/adapter.py`` + ``custom_modules.Block``) and
ST-Adapter (linziyi96/st-adapter ``models_adapter.py``) are written out below from their
published equations, on the adapted timm block's own frozen modules and the adapter's
weights, and compared with what medtune computes. The Med-Tuning loss value was
computed once with the official ``softmax_dice`` (jessie-chen99/Med-Tuning-Official
``utils/criterions.py``) on :func:`dice_recipe` (float64, label values 0/1/2/4).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from medtune.adapters import AdaptFormerConfig, MedTuningConfig, STAdapterConfig, apply_adapter, describe
from medtune.adapters.med_tuning import SliceFrequencyFilter, SliceIndexFilter
from medtune.errors import DataError
from medtune.models import BackboneConfig, create_backbone
from tests import REPO

CONFIGS = REPO / "configs"
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


# --------------------------------------------------------------------------- Med-Tuning


def test_med_tuning_interacts_at_every_stage_with_the_official_parameter_count():
    """ViT-B, ratio 6, 128 slices: interaction modules at blocks 2, 5, 8, 11; 220,672 parameters
    per block adapter and 2,845,696 in all with the official filter (built on the meta device)."""
    counts = {}
    for filter_slices in (128, None):
        with torch.device("meta"):
            backbone = create_backbone(BackboneConfig(name="vit_base_patch16_224", in_chans=4, img_size=128))
            apply_adapter(backbone, MedTuningConfig(filter_slices=filter_slices))
        adapters = [block.med_adapter for block in backbone.model.blocks]
        assert [i for i, a in enumerate(adapters) if a.interaction is not None] == [2, 5, 8, 11]
        plain = sum(p.numel() for name, p in adapters[0].named_parameters())
        counts[filter_slices] = (plain, sum(p.numel() for a in adapters for p in a.parameters()))
    assert counts[128] == (220_672, 2_845_696)
    # medtune's slice-count-free filter stores 65 frequencies instead of 128 FFT indices
    assert counts[None] == (220_672 - 2 * (128 - 65), 2_845_696 - 12 * 2 * (128 - 65))
    assert MedTuningConfig().zero_init_up is False and MedTuningConfig().first_stage_interaction is True


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_med_tuning_first_stage_reads_a_zero_map(family):
    torch.manual_seed(0)
    backbone = apply_adapter({"vit": vit, "swin": swin}[family](), MedTuningConfig())
    blocks = backbone.model.blocks if family == "vit" else [layer.blocks[-1] for layer in backbone.model.layers]
    first = blocks[0].med_adapter
    hidden = first.down.out_features
    previous = first.interaction.previous
    # official block_attn: h channels at the stage's resolution (ViT), h/2 at twice it (Swin)
    if family == "vit":
        assert (previous.in_channels, previous.kernel_size, previous.stride) == (hidden, (1, 1, 1), (1, 1, 1))
    else:
        assert (previous.in_channels, previous.kernel_size, previous.stride) == (hidden // 2, (1, 3, 3), (1, 2, 2))
    assert first.up.weight.abs().sum() > 0  # the official up-projection: PyTorch's default init
    current = torch.randn(2, hidden, 3, 4, 4)
    with torch.no_grad():
        mixed = first.interaction(current, first.interaction.zero_previous(current))
        constant = previous.bias.view(1, -1, 1, 1, 1).expand(2, -1, 3, 4, 4)
        assert torch.allclose(mixed, first.interaction.mix(torch.cat([current, constant], 1)), atol=1e-6)
    zero_init = apply_adapter({"vit": vit, "swin": swin}[family](), MedTuningConfig(zero_init_up=True, first_stage_interaction=False))
    first = (zero_init.model.blocks if family == "vit" else zero_init.model.layers[0].blocks)[-1 if family == "swin" else 0]
    assert first.med_adapter.interaction is None and not first.med_adapter.up.weight.any()


def test_med_tuning_official_filter_and_how_it_maps_onto_medtunes():
    torch.manual_seed(0)
    num_slices = 8
    z = torch.randn(2, 3, num_slices, 4, 4)
    official = SliceIndexFilter(num_slices)
    with torch.no_grad():
        official.weight.uniform_(0.5, 1.5)
        official.bias.uniform_(-0.5, 0.5)
        w, b = official.weight.view(1, 1, -1, 1, 1), official.bias.view(1, 1, -1, 1, 1)
        expected = torch.fft.ifftn(torch.fft.fftn(z, dim=(2, 3, 4)) * w + b, dim=(2, 3, 4)).abs()
        assert torch.allclose(official(z), expected, atol=1e-5)
        with pytest.raises(DataError, match="filter_slices is 8 but the volume has 6 slices"):
            official(z[:, :, :6])
        # a symmetric official filter (w_t = w_{T-t}, as at initialisation) is medtune's filter
        # stored at the T/2 + 1 rfft frequencies: weight[k] = w_k
        index = torch.arange(num_slices)
        symmetric_index = torch.minimum(index, num_slices - index)
        official.weight.copy_(official.weight[symmetric_index])
        official.bias.copy_(official.bias[symmetric_index])
        ours = SliceFrequencyFilter(num_slices // 2 + 1)
        ours.weight.copy_(official.weight[: num_slices // 2 + 1])
        ours.bias.copy_(official.bias[: num_slices // 2 + 1])
        assert torch.allclose(ours(z), official(z), atol=1e-5)


def dice_recipe() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(2, 4, 8, 8, 4)`` and class indices ``(2, 8, 8, 4)`` (labels 0/1/2/4)."""
    k = torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1, 1)
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1, 1)
    h = torch.arange(8, dtype=torch.float64).view(1, 1, 8, 1, 1)
    w = torch.arange(8, dtype=torch.float64).view(1, 1, 1, 8, 1)
    d = torch.arange(4, dtype=torch.float64).view(1, 1, 1, 1, 4)
    logits = torch.sin(0.7 * h * (k + 1) + 0.3 * w - 0.5 * d + b) + 0.2 * torch.cos(1.1 * w * (k + 2) + h * d)
    index = ((h + 2 * w + 3 * d + 5 * b).long() % 7).clamp(max=3)[:, 0]
    return logits, index


def test_official_recipe_trains_with_the_official_softmax_dice_on_128_slices():
    from medtune.models.losses import LossContext, build_criterion

    logits, index = dice_recipe()
    criterion = build_criterion({"softmax_dice": 1.0}, LossContext(logits.shape[1], logits.ndim - 2))
    assert float(criterion({"logits": logits}, index)["loss"]) == pytest.approx(OFFICIAL_SOFTMAX_DICE, rel=1e-9)

    recipe = yaml.safe_load((CONFIGS / "medtuning_vit_b16_brats.yaml").read_text())
    assert recipe["data"]["crop_size"] == [128, 128, 128]
    assert recipe["loss"] == {"softmax_dice": 1.0}
    adapter = recipe["adapter"]
    assert (adapter["ratio"], adapter["zero_init_up"], adapter["first_stage_interaction"]) == (6, False, True)
    optim = recipe["train"]["optim"]
    assert (optim["name"], optim["lr"], optim["weight_decay"], optim["amsgrad"]) == ("adam", 2e-3, 1e-5, True)
