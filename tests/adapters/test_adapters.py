"""medtune.adapters: shapes, identity at init, what trains, slice mixing, LoRA vs peft, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.adapters import (
    ADAPTERS,
    AdaptFormerConfig,
    AdapterConfig,
    LoraAdapterConfig,
    MedTuningConfig,
    STAdapterConfig,
    VPTConfig,
    adapter_config_dict,
    adapter_config_from_dict,
    adapter_state_dict,
    apply_adapter,
    count_parameters,
    describe,
    load_adapter,
    load_adapter_state,
    merge_lora,
    save_adapter,
    set_num_slices,
    slice_axis_filter,
    slice_context,
    trainable_parameters,
    volume_to_slices,
    slices_to_volume,
)
from medtune.adapters.med_tuning import DepthwiseSliceConv, SliceFrequencyFilter
from medtune.errors import CheckpointError, ConfigError, DataError
from medtune.models import BackboneConfig, create_backbone

torch.set_num_threads(1)

IMG = 32


def vit(embed_dim: int = 48, depth: int = 4):
    """ViT with 4x4 patch tokens per 32 px slice, one cls token, 4 blocks = 4 stages."""
    options = {"patch_size": 8, "depth": depth, "embed_dim": embed_dim, "num_heads": 2}
    return create_backbone(BackboneConfig(name="vit_tiny_patch16_224", in_chans=4, img_size=IMG, options=options))


def swin():
    """Swin with 4 stages of one block each: 8x8, 4x4, 2x2, 1x1 tokens per 32 px slice."""
    options = {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 2, 3, 4), "window_size": 4}
    return create_backbone(
        BackboneConfig(name="swin_tiny_patch4_window7_224", in_chans=4, img_size=IMG, options=options)
    )


BACKBONES = {"vit": vit, "swin": swin}

METHOD_CONFIGS = {
    "med-tuning": lambda: MedTuningConfig(zero_init_up=True),
    "lora": lambda: LoraAdapterConfig(r=4),
    "adaptformer": lambda: AdaptFormerConfig(bottleneck=8),
    "st-adapter": lambda: STAdapterConfig(),
    "vpt": lambda: VPTConfig(num_tokens=3),
    "full": lambda: AdapterConfig(method="full"),
    "decoder-only": lambda: AdapterConfig(method="decoder-only"),
}


def slices(num_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_images, 4, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def stages(backbone, x: torch.Tensor, num_slices: int) -> list[torch.Tensor]:
    with slice_context(backbone, num_slices):
        return backbone.forward_stages(x)


def randomize(module: torch.nn.Module, names: tuple[str, ...], seed: int = 1) -> None:
    """Give zero-initialised projections random values so the adapter is no identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(part in name for part in names):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def test_registry_holds_every_method():
    assert set(ADAPTERS.names()) == set(METHOD_CONFIGS)
    cfg = adapter_config_from_dict({"method": "lora", "r": 2, "backbone": "ignored"})
    assert isinstance(cfg, LoraAdapterConfig) and cfg.r == 2
    with pytest.raises(ConfigError, match="rank"):
        adapter_config_from_dict({"method": "lora", "rank": 2})
    with pytest.raises(ConfigError, match="unknown adapter 'prefix-tuning'"):
        adapter_config_from_dict({"method": "prefix-tuning"})


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_adapters_keep_stage_shapes(family, method):
    backbone = BACKBONES[family]().eval()
    x = slices(6)
    with torch.no_grad():
        frozen = backbone.forward_stages(x)
    if family == "swin" and method == "vpt":
        with pytest.raises(ConfigError, match="ViT backbones only"):
            apply_adapter(backbone, METHOD_CONFIGS[method]())
        return
    apply_adapter(backbone, METHOD_CONFIGS[method]())
    with torch.no_grad():
        adapted = stages(backbone, x, num_slices=3)
    assert [s.shape for s in adapted] == [s.shape for s in frozen]
    # zero-initialised methods start exactly as the frozen model
    if method in ("med-tuning", "adaptformer", "st-adapter", "lora", "full", "decoder-only"):
        for a, f in zip(adapted, frozen):
            assert torch.allclose(a, f, atol=1e-6)
    total, trainable = count_parameters(backbone)
    report = describe(backbone)
    assert report["method"] == method and report["total"] == total
    assert sum(report["groups"].values()) == trainable
    if method == "full":
        assert trainable == total
    elif method == "decoder-only":
        assert trainable == 0
    else:
        assert 0 < report["groups"]["adapter"] == trainable - report["groups"]["extras"] < total


def test_petl_baselines_by_hand():
    """VPT-deep: num_tokens fresh prompts per block after the class token. (AdaptFormer and
    ST-Adapter against their published equations: tests/test_fidelity_finetune.py.)"""
    backbone = apply_adapter(vit(), VPTConfig(num_tokens=3)).eval()
    seen = []
    backbone.model.blocks[2].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        backbone.forward_stages(slices(2))
    prompts = backbone.model.blocks[2].vpt.prompt
    assert seen[0].shape == (2, 1 + 3 + 16, 48)  # class token, 3 prompts, 16 patches
    assert torch.equal(seen[0][:, 1:4], prompts.expand(2, -1, -1))
    assert count_parameters(backbone)[1] == 4 * 3 * 48  # prompts of 4 blocks only


def test_med_tuning_groups_and_extras():
    backbone = apply_adapter(vit(), MedTuningConfig())
    model = backbone.model
    extras = model.pos_embed.numel() + model.norm.weight.numel() + model.norm.bias.numel()
    adapter = sum(p.numel() for b in model.blocks for p in b.med_adapter.parameters())
    report = describe(backbone)
    assert report["groups"] == {"adapter": adapter, "extras": extras, "other": 0}
    assert set(trainable_parameters(backbone)) == {
        n for n, _ in backbone.named_parameters() if ".med_adapter." in n
    } | {"model.pos_embed", "model.norm.weight", "model.norm.bias"}
    # hidden width C / 6 = 8; stage ends are the backbone's out_indices (one stage per block here)
    assert model.blocks[0].med_adapter.down.out_features == 48 // 6
    # every stage end interacts, the first with a zero "previous" map (the official code)
    assert all(model.blocks[i].med_adapter.interaction is not None for i in (0, 1, 2, 3))
    # inside a larger model (backbone + decoder) the decoder is "other"; state names stay the backbone's
    segmenter = torch.nn.ModuleDict({"backbone": backbone, "decoder": torch.nn.Linear(4, 5)})
    assert describe(segmenter)["groups"] == {"adapter": adapter, "extras": extras, "other": 25}
    assert adapter_state_dict(segmenter).keys() == adapter_state_dict(backbone).keys()
    with pytest.raises(ConfigError, match="already has an adapter"):
        apply_adapter(backbone, MedTuningConfig())
    with pytest.raises(ConfigError, match="'pos_embedding' matches no backbone parameter"):
        apply_adapter(vit(), MedTuningConfig(trainable_extras=["pos_embedding"]))


@pytest.mark.parametrize(
    "family, cfg",
    [
        ("vit", MedTuningConfig()),
        ("swin", MedTuningConfig()),
        ("vit", LoraAdapterConfig(r=2)),
        ("vit", VPTConfig(num_tokens=2)),
        ("swin", STAdapterConfig()),
        ("swin", AdaptFormerConfig(bottleneck=4)),
    ],
    ids=lambda v: v if isinstance(v, str) else v.method,
)
def test_training_changes_only_trainable_tensors(family, cfg):
    backbone = apply_adapter(BACKBONES[family](), cfg).train()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    trainable = set(trainable_parameters(backbone))
    marker = {"med-tuning": ".med_adapter.", "lora": ".lora_", "vpt": ".vpt.",
              "st-adapter": ".st_adapter.", "adaptformer": ".adaptformer."}[cfg.method]
    extras = {"model.norm.weight", "model.norm.bias"} | ({"model.pos_embed"} if family == "vit" else set())
    expected = {n for n in before if marker in n} | (extras if cfg.method == "med-tuning" else set())
    assert trainable == expected
    optimizer = torch.optim.AdamW(trainable_parameters(backbone).values(), lr=1e-2, weight_decay=0.1)
    x = slices(4)
    for _ in range(3):
        loss = sum((s - 1).pow(2).mean() for s in stages(backbone, x, num_slices=2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    for name, param in backbone.named_parameters():
        if name not in trainable:
            assert torch.equal(param, before[name]), name
    assert changed <= trainable
    own = {n for n in trainable if describe_group(backbone, n) == "adapter"}
    assert own and own <= changed  # every adapter tensor learned something


def describe_group(backbone, name: str) -> str | None:
    return backbone.medtune_adapter.group(name)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_med_adapter_mixes_neighbouring_slices(family):
    num_slices, t = 5, 2
    x = slices(num_slices)
    x_perturbed = x.clone()
    x_perturbed[t] += torch.randn_like(x[t])

    frozen = BACKBONES[family]().eval()
    with torch.no_grad():
        out, out_perturbed = frozen.forward_stages(x)[-1], frozen.forward_stages(x_perturbed)[-1]
    unchanged = [i for i in range(num_slices) if i != t]
    assert torch.equal(out[unchanged], out_perturbed[unchanged])  # slices are independent images

    adapted = apply_adapter(BACKBONES[family](), MedTuningConfig(zero_init_up=False)).eval()
    with torch.no_grad():
        out = stages(adapted, x, num_slices)[-1]
        out_perturbed = stages(adapted, x_perturbed, num_slices)[-1]
    for neighbour in (t - 1, t + 1):
        assert not torch.allclose(out[neighbour], out_perturbed[neighbour], atol=1e-4)


def test_med_adapter_any_slice_count_and_volume_layout():
    backbone = apply_adapter(vit(), MedTuningConfig(zero_init_up=False)).eval()
    for num_slices in (3, 7, 16):
        volume = torch.randn(1, 4, IMG, IMG, num_slices)
        with torch.no_grad():
            out = stages(backbone, volume_to_slices(volume), num_slices)
        assert [tuple(s.shape) for s in out] == [(num_slices, 48, 4, 4)] * 4
        assert torch.isfinite(out[-1]).all()
    # two volumes in one batch do not mix: perturbing volume 1 leaves volume 0 unchanged
    volume = torch.randn(2, 4, IMG, IMG, 3)
    other = volume.clone()
    other[1] += 1.0
    with torch.no_grad():
        a = slices_to_volume(stages(backbone, volume_to_slices(volume), 3)[-1], 3)
        b = slices_to_volume(stages(backbone, volume_to_slices(other), 3)[-1], 3)
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1], atol=1e-4)

    set_num_slices(backbone, None)
    with pytest.raises(ConfigError, match="set_num_slices"):
        backbone.forward_stages(slices(3))
    set_num_slices(backbone, 4)
    with pytest.raises(DataError, match="6 slices is not a whole number of volumes of 4"):
        backbone.forward_stages(slices(6))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_med_adapter_gradients_survive_block_checkpointing(family):
    """Stage maps cross block boundaries through the slice context; timm's (non-reentrant)
    activation checkpointing must give the same gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = apply_adapter(BACKBONES[family](), MedTuningConfig(zero_init_up=False)).eval()
        backbone.model.set_grad_checkpointing(checkpointing)
        set_num_slices(backbone, 3)
        sum(s.pow(2).mean() for s in backbone.forward_stages(slices(6))).backward()
        grads.append({n: p.grad for n, p in trainable_parameters(backbone).items()})
    interaction = [n for n in grads[0] if ".interaction.previous." in n]
    # the first stage's previous map is zero: of its conv only the bias learns
    zero_input = {n for n in interaction if n.startswith(("model.blocks.0.", "model.layers.0.")) and n.endswith("weight")}
    assert interaction and all(grads[0][n].abs().sum() > 0 for n in interaction if n not in zero_input)
    for name, grad in grads[0].items():
        if grad is None:  # the final norm: forward_stages does not apply it
            assert grads[1][name] is None, name
        else:
            assert torch.allclose(grad, grads[1][name], atol=1e-5), name


def test_deepcopy_gets_its_own_adapters_and_slice_context():
    import copy

    backbone = apply_adapter(vit(), MedTuningConfig()).eval()
    clone = copy.deepcopy(backbone)  # e.g. an EMA or teacher copy
    x = slices(4)
    with torch.no_grad():
        reference = stages(backbone, x, 2)[-1]
        randomize(clone, ("med_adapter.up",))
        assert torch.equal(stages(backbone, x, 2)[-1], reference)
        assert not torch.allclose(stages(clone, x, 2)[-1], reference, atol=1e-4)
    set_num_slices(backbone, 2)
    with slice_context(clone, 4):
        assert clone.medtune_adapter.slice_context.num_slices == 4
        assert backbone.medtune_adapter.slice_context.num_slices == 2
    assert clone.medtune_adapter.slice_context.num_slices is None  # restored
    assert clone.model.blocks[0].med_adapter.slice_context is clone.medtune_adapter.slice_context


def test_volume_slice_layout_roundtrip():
    volume = torch.arange(2 * 1 * 2 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 2, 3)
    flat = volume_to_slices(volume)
    assert flat.shape == (6, 1, 2, 2)
    assert torch.equal(flat[1 * 3 + 2], volume[1, :, :, :, 2])  # image b*T + t is slice t of volume b
    assert torch.equal(slices_to_volume(flat, 3), volume)


def test_med_adapter_equation_by_hand():
    """out = x + GELU(up(z + a)), z = GELU(down(x)), a = mix(cat(fuse(b3 + b5 + freq), prev(a_0)));
    written out with plain Conv3d/FFT calls on the adapter's own weights."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    backbone = apply_adapter(vit(), MedTuningConfig(zero_init_up=False)).eval()
    adapter = backbone.model.blocks[1].med_adapter  # stage 1: reads stage 0's map
    randomize(adapter, ("enhance", "interaction"))
    with torch.no_grad():
        for bn in (adapter.enhance.branch3[2], adapter.enhance.branch5[2]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    volumes, num_slices, grid, dim = 2, 3, (4, 4), 48
    hidden = dim // 6
    ctx = backbone.medtune_adapter.slice_context
    ctx.num_slices, ctx.token_grid = num_slices, grid
    previous = torch.randn(volumes, hidden, num_slices, *grid)
    ctx.stage_maps[0] = previous
    x = torch.randn(volumes * num_slices, 1 + 16, dim)
    with torch.no_grad():
        out = adapter(x)
        patches = x[:, 1:]  # (B*T, 16, C); the class token passes through
        z = F.gelu(adapter.down(patches))  # (B*T, 16, h)
        z = z.reshape(volumes, num_slices, *grid, hidden).permute(0, 4, 1, 2, 3)  # (B, h, T, 4, 4)

        def branch(seq):
            in_slice, across, bn, _ = seq
            y = F.conv3d(z, in_slice.weight, in_slice.bias, padding=in_slice.padding, groups=hidden)
            y = F.conv3d(y, across.weight, across.bias, padding=across.padding, groups=hidden)
            return torch.relu(bn(y))

        freq = adapter.enhance.frequency
        w = slice_axis_filter(freq.weight, num_slices)[:, None, None]
        b = slice_axis_filter(freq.bias, num_slices)[:, None, None]
        spectral = torch.fft.ifftn(torch.fft.fftn(z, dim=(2, 3, 4)) * w + b, dim=(2, 3, 4)).abs()
        a = adapter.enhance.fuse(branch(adapter.enhance.branch3) + branch(adapter.enhance.branch5) + spectral)
        a = adapter.interaction.mix(torch.cat([a, adapter.interaction.previous(previous)], dim=1))
        update = F.gelu(adapter.up((z + a).permute(0, 2, 3, 4, 1).reshape(volumes * num_slices, 16, hidden)))
    assert adapter.interaction.previous.kernel_size == (1, 1, 1)  # ViT: 1x1x1 from the previous stage
    assert torch.equal(out[:, :1], x[:, :1])
    assert torch.allclose(out[:, 1:], patches + update, atol=1e-5)
    assert torch.allclose(ctx.stage_maps[1], a, atol=1e-5)  # handed on to stage 2
    ctx.stage_maps.clear()


def test_slice_axis_filter_hand_worked():
    values = torch.tensor([0.0, 1.0, 2.0])  # at |f| = 0, 1/4, 1/2 cycles per slice
    assert torch.allclose(slice_axis_filter(values, 4), torch.tensor([0.0, 1.0, 2.0, 1.0]))
    expected8 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5])
    assert torch.allclose(slice_axis_filter(values, 8), expected8)
    assert torch.allclose(slice_axis_filter(values, 1), torch.tensor([0.0]))
    # with the default 65 bins and the official 128 slices, one parameter per rfft bin
    bins = torch.randn(65)
    index = torch.arange(128)
    assert torch.allclose(slice_axis_filter(bins, 128), bins[torch.minimum(index, 128 - index)])


def test_frequency_branch_matches_complex_fftn():
    gen = torch.Generator().manual_seed(0)
    frequency = SliceFrequencyFilter(filter_bins=9)
    with torch.no_grad():
        frequency.weight.copy_(torch.rand(9, generator=gen) + 0.5)
        frequency.bias.copy_(torch.randn(9, generator=gen))
    z = torch.randn(2, 3, 6, 4, 5, generator=gen)
    w = slice_axis_filter(frequency.weight, 6)[:, None, None]
    b = slice_axis_filter(frequency.bias, 6)[:, None, None]
    reference = torch.fft.ifftn(torch.fft.fftn(z, dim=(2, 3, 4)) * w + b, dim=(2, 3, 4)).abs()
    assert torch.allclose(frequency(z), reference, atol=1e-5)


@pytest.mark.parametrize("kernel", [3, 5])
def test_depthwise_slice_conv_equals_its_conv3d_modules(kernel):
    """The 2D-view forward computes exactly Conv3d (1,k,k) -> Conv3d (k,1,1) -> BN -> ReLU."""
    torch.manual_seed(0)
    branch = DepthwiseSliceConv(3, kernel)
    with torch.no_grad():
        for conv in (branch[0], branch[1]):
            conv.weight.normal_()
            conv.bias.normal_()
    z = torch.randn(2, 3, 6, 4, 5)
    probe = torch.randn(2, 3, 6, 4, 5)

    def run(forward):
        branch.zero_grad()
        zz = z.clone().requires_grad_()
        out = forward(zz)
        (out * probe).sum().backward()
        return [out.detach(), zz.grad] + [p.grad.clone() for p in branch.parameters()]

    in_slice, across, norm, act = branch
    fast = run(branch)
    reference = run(lambda zz: act(norm(across(in_slice(zz)))))
    for got, want in zip(fast, reference):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # a single voxel only reaches its (1,k,k) neighbourhood in its slice, then k slices
    single = torch.zeros(1, 3, 9, 7, 7)
    single[0, :, 4, 3, 3] = 1.0
    with torch.no_grad():
        spread = across(in_slice(single)) - across(in_slice(torch.zeros_like(single)))
    reach = spread.abs().sum(1)[0] > 0  # (T, Hp, Wp)
    half = kernel // 2
    expected = torch.zeros(9, 7, 7, dtype=torch.bool)
    expected[4 - half : 5 + half, 3 - half : 4 + half, 3 - half : 4 + half] = True
    assert torch.equal(reach, expected)


def peft_trainable_count(targets: list[str], r: int) -> int:
    from peft import LoraConfig, get_peft_model

    model = vit().model
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    return peft_model.get_nb_trainable_parameters()[0]


def test_lora_matches_peft_and_merges():
    backbone = apply_adapter(vit(), LoraAdapterConfig(r=4, alpha=8.0)).eval()
    assert count_parameters(backbone)[1] == peft_trainable_count(["qkv", "attn.proj", "fc1", "fc2"], 4)
    # 4 blocks x (qkv 4*(48+144) + proj 4*(48+48) + fc1 4*(48+192) + fc2 4*(192+48))
    assert count_parameters(backbone)[1] == 4 * 4 * ((48 + 144) + (48 + 48) + (48 + 192) + (192 + 48))
    assert isinstance(backbone.model.patch_embed.proj, torch.nn.Conv2d)
    assert not any("patch_embed" in n for n in trainable_parameters(backbone))
    with pytest.raises(ConfigError, match="patch-embedding stem"):
        apply_adapter(vit(), LoraAdapterConfig(target_modules=["qkv", "proj"]))

    randomize(backbone, ("lora_B",))
    x = slices(2)
    with torch.no_grad():
        unmerged = backbone.forward_stages(x)
    plain_keys = set(vit().state_dict())
    merge_lora(backbone)
    assert set(backbone.state_dict()) == plain_keys
    with torch.no_grad():
        merged = backbone.forward_stages(x)
    for a, b in zip(unmerged, merged):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(merged[-1], vit().eval().forward_stages(x)[-1], atol=1e-3)


def test_lora_on_monai_swinunetr_targets_its_linears():
    cfg = BackboneConfig(name="swinunetr", in_chans=4, img_size=IMG, options={"feature_size": 12})
    backbone = apply_adapter(create_backbone(cfg), LoraAdapterConfig(r=2, alpha=4.0))
    targets = ["qkv", "attn.proj", "mlp.linear1", "mlp.linear2"]
    assert backbone.medtune_adapter.config.target_modules is None
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(create_backbone(cfg).model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    assert count_parameters(backbone)[1] == reference.get_nb_trainable_parameters()[0]
    assert any(".mlp.linear1.lora_A." in n for n in trainable_parameters(backbone))
    with pytest.raises(ConfigError, match="needs a timm ViT or Swin"):
        apply_adapter(create_backbone(cfg), MedTuningConfig())


def test_adapter_state_roundtrip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    pretrained = vit()
    pretrained_state = {n: t.clone() for n, t in pretrained.state_dict().items()}
    backbone = apply_adapter(pretrained, MedTuningConfig()).train()
    optimizer = torch.optim.Adam(trainable_parameters(backbone).values(), lr=1e-2)
    x = slices(6)
    for _ in range(2):  # also moves the adapters' BatchNorm statistics
        loss = stages(backbone, x, 3)[-1].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    state = adapter_state_dict(backbone)
    param_names = set(trainable_parameters(backbone))
    bn_buffers = {
        n for n in backbone.state_dict()
        if ".med_adapter." in n and ("running_" in n or "num_batches" in n)
    }
    assert bn_buffers and set(state) == param_names | bn_buffers

    save_adapter(backbone, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    config = json.loads((tmp_path / "adapter.json").read_text())
    assert config == adapter_config_dict(backbone)
    assert config["method"] == "med-tuning" and config["backbone"] == "vit_tiny_patch16_224"

    fresh = vit()
    fresh.load_state_dict(pretrained_state)  # the same pretrained weights, as in a real run
    apply_adapter(fresh, adapter_config_from_dict(config))
    load_adapter(fresh, tmp_path)
    backbone.eval()
    fresh.eval()
    x_eval = slices(3, seed=5)
    with torch.no_grad():
        for a, b in zip(stages(backbone, x_eval, 3), stages(fresh, x_eval, 3)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_base_state_is_the_backbone_before_the_adapter(family, method):
    """base_state_dict reads the pre-adapter backbone back from an adapted one (own tensors
    left out, LoRA's base_layer names mapped back); load_base_state puts it into another."""
    from medtune.adapters import base_state_dict, load_base_state

    if method == "vpt" and family == "swin":
        pytest.skip("VPT-deep is for ViT")
    torch.manual_seed(0)
    backbone = BACKBONES[family]()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    apply_adapter(backbone, METHOD_CONFIGS[method]())
    base = base_state_dict(backbone)
    assert set(base) == set(before)
    assert all(torch.equal(base[k], before[k]) for k in before)
    torch.manual_seed(1)
    other = apply_adapter(BACKBONES[family](), METHOD_CONFIGS[method]())
    load_base_state(other, base, source="base.safetensors")
    assert all(torch.equal(base_state_dict(other)[k], before[k]) for k in before)
    with pytest.raises(CheckpointError, match="base.safetensors: not the base weights"):
        load_base_state(other, {**base, "model.extra": torch.zeros(1)}, source="base.safetensors")


def test_adapter_of_another_backbone_is_refused():
    small = apply_adapter(vit(embed_dim=48), MedTuningConfig())
    wide = apply_adapter(vit(embed_dim=96), MedTuningConfig())
    with pytest.raises(CheckpointError, match=r"tensor 'model\.[a-z_.0-9]+' has shape"):
        load_adapter_state(wide, adapter_state_dict(small), source="small.safetensors")
    state = adapter_state_dict(small)
    state["model.blocks.0.attn.qkv.weight"] = small.state_dict()["model.blocks.0.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match="'model.blocks.0.attn.qkv.weight' is not a trained tensor"):
        load_adapter_state(small, state)
    lora_state = adapter_state_dict(apply_adapter(vit(), LoraAdapterConfig(r=2)))
    with pytest.raises(CheckpointError, match="lora_A"):
        load_adapter_state(small, lora_state)
