"""Every pretraining objective trains a tiny backbone on generated data; MAE encodes only
visible tokens; configs are strict; the reconstruction figure is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medtune.config import from_dict, to_dict
from medtune.errors import ConfigError
from medtune.models import BackboneConfig, create_backbone
from medtune.pretrain import (
    OBJECTIVES,
    FreMAEConfig,
    MAEConfig,
    MFMConfig,
    ObjectiveConfig,
    SimMIMConfig,
    build_objective,
    save_reconstruction,
)
from medtune.pretrain.decoder import MultiStageDecoder, pyramid_strides
from medtune.pretrain.fremae import FreMAE


@pytest.fixture
def swinunetr(tiny_swinunetr_options):
    """``swinunetr(spatial_dims, img_size, patch_size=2)``: the tiny SwinUNETR encoder
    (feature size 12, one block and one head per stage) with windows of 4, on 2 channels."""

    def build(spatial_dims: int, img_size: int, patch_size: int = 2):
        options = dict(tiny_swinunetr_options, window_size=4, patch_size=patch_size)
        return create_backbone(BackboneConfig("swinunetr", 2, img_size, spatial_dims, options=options))

    return build


@pytest.fixture
def tiny_vit(tiny_vit_config):
    """``tiny_vit(img_size=32)``: the tiny ViT (4 blocks, width 192, 16 px patches) on 2 channels."""

    def build(img_size: int = 32):
        return create_backbone(dataclasses.replace(tiny_vit_config, in_chans=2, img_size=img_size))

    return build


def blobs(n: int, shape: tuple[int, ...], modalities: int = 2, seed: int = 0) -> dict:
    """``n`` images of smooth Gaussian blobs inside a centred ellipse of foreground."""
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    foreground = (sum(a**2 for a in axes) < 0.8).expand(n, *shape)
    images = torch.zeros(n, modalities, *shape)
    for _ in range(3):
        centre = torch.rand(n, len(shape), generator=gen) * 1.2 - 0.6
        width = 0.15 + 0.3 * torch.rand(n, 1, generator=gen)
        dist = sum((a.unsqueeze(0) - centre[:, i].view(-1, *[1] * len(shape))) ** 2 for i, a in enumerate(axes))
        amplitude = torch.rand(n, modalities, generator=gen) + 0.5
        images += amplitude.view(n, modalities, *[1] * len(shape)) * torch.exp(-dist / width.view(-1, *[1] * len(shape)) ** 2).unsqueeze(1)
    images = (images + 0.2) * foreground.unsqueeze(1)  # background exactly 0
    return {"image": images, "foreground": foreground}


def train_losses(objective: torch.nn.Module, data: dict, steps: int, lr: float = 2e-3, batch: int = 4) -> list[float]:
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=lr)
    n = data["image"].shape[0]
    losses = []
    for step in range(steps):
        index = torch.arange(step * batch, (step + 1) * batch) % n
        out = objective({k: v[index] for k, v in data.items()})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    return losses


def assert_loss_falls(losses: list[float], factor: float = 0.9) -> None:
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < factor * first, f"loss did not fall: first5 {first:.4f} last5 {last:.4f}"


@pytest.mark.parametrize(
    "name,backbone,shape,cfg",
    [  # backbone: the builder fixture's name and its arguments
        ("fremae-2d-swinunetr", ("swinunetr", 2, 32), (32, 32), dict(name="fremae", radius=3)),
        ("fremae-3d-swinunetr", ("swinunetr", 3, 16, 1), (16, 16, 16), dict(name="fremae", radius=1, decoder_width=8)),
        ("fremae-vit-patch", ("tiny_vit", 32), (32, 32), dict(name="fremae", radius=3, mask_mode="patch", mask_ratio=0.5)),
        ("mae", ("tiny_vit", 32), (32, 32), dict(name="mae", decoder_dim=32, decoder_depth=1)),
        ("simmim", ("tiny_vit", 32), (32, 32), dict(name="simmim", mask_block=16, mask_ratio=0.5)),
        ("mfm", ("tiny_vit", 32), (32, 32), dict(name="mfm")),
    ],
)
def test_objective_loss_falls_on_generated_data(name, backbone, shape, cfg, request):
    builder, *args = backbone
    build = request.getfixturevalue(builder)
    torch.manual_seed(0)
    net = build(*args)
    objective = build_objective(from_dict(ObjectiveConfig, cfg), net)
    assert objective.backbone is net  # what backbone.safetensors is written from
    losses = train_losses(objective, blobs(8, shape), steps=25)
    assert_loss_falls(losses)


def test_fremae_2d_and_3d_share_one_code_path_and_report_logs(swinunetr):
    torch.manual_seed(0)
    for dims, size, patch in ((2, 32, 2), (3, 16, 1)):
        objective = build_objective(FreMAEConfig(radius=1, decoder_width=8), swinunetr(dims, size, patch))
        assert type(objective) is FreMAE and type(objective.decoder) is MultiStageDecoder
        data = blobs(2, (size,) * dims)
        out = objective(data)
        assert set(out) == {"loss", "loss_high", "loss_low", "mask_ratio"}
        assert float(out["loss"].detach()) == pytest.approx(float(1.0 * out["loss_high"] + 1.3 * out["loss_low"]), rel=1e-5)
        assert abs(float(out["mask_ratio"]) - 0.25) < 0.01
        recon = objective.reconstruct(data)
        assert recon["pred_high"].shape == data["image"].shape
        if dims == 3:  # a crop of another size than the backbone was configured for
            other = blobs(2, (16, 16, 32))
            assert objective.reconstruct(other)["pred_low"].shape == (2, 2, 4, 4, 8)
            assert torch.isfinite(objective(other)["loss"])
        assert recon["pred_low"].shape == (2, 2) + (size // 4,) * dims
        assert recon["target_low_spectrum"].shape == (2, 2) + (size // 4,) * dims


def test_fremae_losses_by_hand_from_the_unmasked_image(swinunetr):
    """L_high / L_low recomputed from the decoder's predictions: the same band filter on
    prediction and target, targets from the *unmasked* image (whole image, pooled 4x for
    the low band), total 1.0 L_high + 1.3 L_low; the encoder sees the masked input."""
    from medtune.pretrain.frequency import apply_band, band_mask, focal_frequency_loss, spectrum

    torch.manual_seed(0)
    objective = build_objective(FreMAEConfig(radius=2, decoder_width=8), swinunetr(2, 32))
    data = blobs(2, (32, 32))
    images = data["image"]
    seen = {}
    encode, decode = objective.forward_encoder, objective.forward_decoder

    def record_encoder(masked, patch_mask=None):
        seen["encoder_input"] = masked
        return encode(masked, patch_mask)

    def record_decoder(stages, size, masked=None):
        seen["pred"] = decode(stages, size, masked)
        return seen["pred"]

    objective.forward_encoder, objective.forward_decoder = record_encoder, record_decoder
    out = objective(data)
    pred_high, pred_low = (p.detach() for p in seen["pred"])
    assert pred_high.shape == (2, 2, 32, 32) and pred_low.shape == (2, 2, 8, 8)
    high = band_mask((32, 32), 2, "square", "high")
    low = band_mask((8, 8), 2, "square", "low")
    pooled = torch.nn.functional.avg_pool2d(images, 4)
    loss_high = focal_frequency_loss(apply_band(spectrum(pred_high, 2), high), apply_band(spectrum(images, 2), high))
    loss_low = focal_frequency_loss(apply_band(spectrum(pred_low, 2), low), apply_band(spectrum(pooled, 2), low))
    assert float(out["loss_high"]) == pytest.approx(float(loss_high), rel=1e-5)
    assert float(out["loss_low"]) == pytest.approx(float(loss_low), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(float(loss_high + 1.3 * loss_low), rel=1e-5)
    # the encoder got the masked, jittered input, not the image the targets come from
    assert not torch.allclose(seen["encoder_input"], images)
    # the low band holds (2r + 1)^2 bins of the pooled image, the high band the rest
    assert int(low.sum()) == 25 and int(high.sum()) == 32 * 32 - 25


def test_fremae_pixel_loss_variant_uses_the_same_model(swinunetr):
    torch.manual_seed(0)
    backbone = swinunetr(2, 32)
    frequency = build_objective(FreMAEConfig(), backbone)
    pixel = build_objective(FreMAEConfig(loss="pixel"), backbone)
    assert frequency.state_dict().keys() == pixel.state_dict().keys()
    data = blobs(2, (32, 32))
    images = data["image"]
    with torch.no_grad():
        pred_high, pred_low = pixel.forward_decoder(pixel.forward_encoder(images), (32, 32), images)
        total, high, low = pixel.forward_loss(images, pred_high, pred_low)
    assert float(high) == pytest.approx(float(((pred_high - images) ** 2).mean()), rel=1e-5)
    assert float(total) == pytest.approx(float(high + 1.3 * low), rel=1e-5)


def _tokens_entering_blocks(vit) -> list[int]:
    seen: list[int] = []
    vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


def test_mae_encoder_sees_only_visible_tokens(tiny_vit):
    torch.manual_seed(0)
    backbone = tiny_vit(64)
    mae = build_objective(MAEConfig(decoder_dim=32, decoder_depth=1), backbone)
    seen = _tokens_entering_blocks(backbone.model)
    out = mae(blobs(2, (64, 64)))
    # 16 patches, 25% visible = 4, plus the class token
    assert seen == [1 + 4]
    assert float(out["mask_ratio"]) == 0.75
    fremae = build_objective(FreMAEConfig(mask_mode="patch", mask_ratio=0.5, radius=3), backbone)
    seen.clear()
    fremae(blobs(2, (64, 64)))
    assert seen == [1 + 8]
    recon = mae.reconstruct(blobs(2, (64, 64)))
    assert recon["prediction"].shape == (2, 2, 64, 64) and recon["mask"].float().mean() == 0.75


def test_each_objective_has_its_own_config_with_its_own_defaults():
    classes = {name: OBJECTIVES.get(name).config_class for name in OBJECTIVES}
    assert classes == {"fremae": FreMAEConfig, "mae": MAEConfig, "mfm": MFMConfig, "simmim": SimMIMConfig}
    assert all(cls().name == name and issubclass(cls, ObjectiveConfig) for name, cls in classes.items())
    assert [f.name for f in dataclasses.fields(ObjectiveConfig)] == ["name"]
    assert (FreMAEConfig().mask_ratio, MAEConfig().mask_ratio, SimMIMConfig().mask_ratio) == (0.25, 0.75, 0.6)
    assert "mask_ratio" not in {f.name for f in dataclasses.fields(MFMConfig)}
    assert (FreMAEConfig().radius, FreMAEConfig().filter_kind) == (10.0, "square")
    assert (MFMConfig().radius, MFMConfig().filter_kind) == (None, "circle")
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in classes.items()}
    assert fields["simmim"] == {"name", "mask_ratio", "mask_block"}
    assert fields["mae"] == {"name", "mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss"}


def test_objective_config_is_picked_by_name_and_strict():
    cfg = from_dict(ObjectiveConfig, {"name": "fremae", "radius": 10, "low_weight": 1.3})
    assert type(cfg) is FreMAEConfig and cfg.radius == 10.0 and isinstance(cfg.radius, float)
    assert from_dict(ObjectiveConfig, {}) == FreMAEConfig()  # no name: FreMAE
    assert from_dict(ObjectiveConfig, {"name": "simmim", "mask_block": 16}) == SimMIMConfig(mask_block=16)
    assert from_dict(ObjectiveConfig, to_dict(MFMConfig(band="low"))) == MFMConfig(band="low")
    with pytest.raises(ConfigError, match="mask_raito"):
        from_dict(ObjectiveConfig, {"mask_raito": 0.5})
    with pytest.raises(ConfigError) as info:
        from_dict(ObjectiveConfig, {"name": "simmim", "decoder_dim": 64}, "objective")
    assert str(info.value) == (
        "objective.decoder_dim is not a key of objective 'simmim' (decoder_dim belongs to 'mae'); "
        "its keys: name, mask_ratio, mask_block"
    )
    with pytest.raises(ConfigError, match=r"^unknown objective.name 'byol' \(known: fremae, mae, mfm, simmim\)$"):
        from_dict(ObjectiveConfig, {"name": "byol"}, "objective")
    with pytest.raises(ConfigError, match="mask_mode"):
        from_dict(ObjectiveConfig, {"mask_mode": "voxel"})
    with pytest.raises(ConfigError, match="objective.band"):
        from_dict(ObjectiveConfig, {"name": "mfm", "band": "middle"})
    with pytest.raises(ConfigError, match="mask_ratio"):
        from_dict(ObjectiveConfig, {"name": "mae", "mask_ratio": 1.0})
    with pytest.raises(ConfigError, match="radius"):
        from_dict(ObjectiveConfig, {"radius": None})  # FreMAE's radius is a number
    with pytest.raises(ConfigError, match="filter_kind"):
        from_dict(ObjectiveConfig, {"filter_kind": "diamond"})


def test_build_objective_checks_config_class_and_backbone(swinunetr, tiny_vit):
    with pytest.raises(ConfigError, match="unknown objective 'byol'"):
        build_objective(ObjectiveConfig(name="byol"), tiny_vit())
    with pytest.raises(ConfigError, match="objective 'mae' needs a MAEConfig, got FreMAEConfig"):
        build_objective(FreMAEConfig(name="mae"), tiny_vit())
    with pytest.raises(ConfigError, match="objective 'fremae' needs a FreMAEConfig, got ObjectiveConfig"):
        build_objective(ObjectiveConfig(), tiny_vit())
    with pytest.raises(ConfigError, match="needs a ViT"):
        build_objective(MAEConfig(), swinunetr(2, 32))
    with pytest.raises(ConfigError, match="needs a ViT"):
        build_objective(FreMAEConfig(mask_mode="patch"), swinunetr(2, 32))
    with pytest.raises(ConfigError, match="mask_block"):
        build_objective(SimMIMConfig(mask_block=20), tiny_vit())
    official = build_objective(FreMAEConfig(filter_kind="square_official", radius=2), tiny_vit())
    high = official.high_spectrum(torch.randn(1, 2, 32, 32))  # centre 16: zeroed rows/cols 14..17
    assert float(high[0, :, 14:18, 14:18].abs().sum()) == 0
    assert bool((high[0, :, 18, 16].abs().sum(-1) > 0).all())  # kept, unlike the symmetric square


def test_decoder_pyramid_for_plain_and_hierarchical_backbones():
    assert pyramid_strides([16, 16, 16, 16]) == [4, 8, 16, 32]
    assert pyramid_strides([2, 4, 8, 16, 32]) == [2, 4, 8, 16, 32]
    decoder = MultiStageDecoder([8] * 4, [16] * 4, out_channels=3, image_size=(64, 64), spatial_dims=2, width=8)
    stages = [torch.randn(2, 8, 4, 4) for _ in range(4)]
    high, low = decoder(stages)
    assert high.shape == (2, 3, 64, 64) and low.shape == (2, 3, 16, 16)
    assert [level.shape[-1] for level in decoder.pyramid(stages)] == [16, 8, 4, 2]
    assert decoder.low_end_level == 1  # the low path ends at stride 8 = 2 * low_pool


@pytest.mark.parametrize("dims", [2, 3])
def test_reconstruction_figure_is_a_png(tmp_path, dims, swinunetr):
    torch.manual_seed(0)
    size, patch = (32, 2) if dims == 2 else (16, 1)
    objective = build_objective(FreMAEConfig(radius=1, decoder_width=8), swinunetr(dims, size, patch))
    path = save_reconstruction(tmp_path / "reconstruction.png", objective.reconstruct(blobs(2, (size,) * dims)))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    simmim = build_objective(SimMIMConfig(mask_block=8), swinunetr(dims, size, patch))
    path = save_reconstruction(tmp_path / "simmim.png", simmim.reconstruct(blobs(2, (size,) * dims)))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make", [("tiny_vit", 64), ("swinunetr", 2, 64)], ids=["tiny_vit", "swinunetr"])
def test_simmim_writes_the_mask_token_over_masked_patch_embeddings_only(make, request):
    builder, *args = make
    build = request.getfixturevalue(builder)
    torch.manual_seed(0)
    backbone = build(*args)
    simmim = build_objective(SimMIMConfig(mask_block=16), backbone).eval()
    stride = simmim.site.stride
    x = torch.randn(1, 2, 64, 64)
    none = torch.zeros(1, 64 // stride, 64 // stride, dtype=torch.bool)
    some = none.clone()
    some[:, :2, :3] = True
    with torch.no_grad():
        plain = backbone.forward_stages(x)[-1]
        unmasked = simmim.forward_encoder(x, none)
        masked = simmim.forward_encoder(x, some)
    assert torch.allclose(unmasked, plain, atol=1e-5)
    assert not torch.allclose(masked, plain, atol=1e-3)
    # what the blocks receive: a hook registered inside the context runs after it
    from medtune.pretrain.simmim import masked_patch_embedding

    seen = []
    with torch.no_grad():
        original = simmim.site.module(x)
        with masked_patch_embedding(simmim.site, some, simmim.mask_token):
            handle = simmim.site.module.register_forward_hook(lambda module, args, out: seen.append(out))
            embedded = simmim.site.module(x)
            handle.remove()
    assert not simmim.site.module._forward_hooks  # the context removed its hook
    token = simmim.mask_token.detach()
    if simmim.site.layout == "tokens":  # (B, L, C)
        rows, kept, kept_original = embedded[0, some[0].flatten()], embedded[0, ~some[0].flatten()], original[0, ~some[0].flatten()]
    else:  # channels_first (B, C, *G)
        grid_last = embedded[0].movedim(0, -1)
        rows, kept, kept_original = grid_last[some[0]], grid_last[~some[0]], original[0].movedim(0, -1)[~some[0]]
    assert torch.equal(seen[0], embedded)
    assert torch.allclose(rows, token.expand_as(rows))
    assert torch.allclose(kept, kept_original)


@pytest.mark.parametrize("band", ["low", "high"])
def test_mfm_corruption_removes_exactly_the_band(band, tiny_vit):
    from medtune.pretrain.frequency import spectrum

    torch.manual_seed(0)
    mfm = build_objective(MFMConfig(band=band), tiny_vit(32))
    images = blobs(2, (32, 32))["image"]
    removed = mfm.removed_bins(images)  # (B, H, W)
    assert removed.shape == (2, 32, 32)
    assert bool(removed[:, 16, 16].all()) == (band == "low")  # the zero frequency
    corrupted = spectrum(mfm.corrupt_input(images, removed), 2)
    original = spectrum(images, 2)
    on = removed.unsqueeze(1).unsqueeze(-1).expand_as(original)
    assert corrupted[on].abs().max() < 1e-4
    assert torch.allclose(corrupted[~on], original[~on], atol=1e-4)


def test_baseline_losses_by_hand(tiny_vit):
    """MAE: MSE to per-patch normalised pixels on masked patches only; SimMIM: L1 on
    masked pixels only; MFM: spectrum distance averaged over the removed bins only."""
    from medtune.pretrain.frequency import spectrum
    from medtune.pretrain.mae import patchify
    from medtune.pretrain.simmim import masked_l1

    torch.manual_seed(0)
    mae = build_objective(MAEConfig(), tiny_vit(32))  # 2 x 2 patches of 16 px, 2 channels
    images = torch.randn(1, 2, 32, 32)
    pred = torch.randn(1, 4, 16 * 16 * 2)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    target = patchify(images, 16)  # (1, 4, 512)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - normed) ** 2).mean(-1)[0]
    expected = (per_patch[0] + per_patch[3]) / 2
    assert float(mae.forward_loss(images, pred, mask)) == pytest.approx(float(expected), rel=1e-5)
    garbage = pred.clone()
    garbage[0, 1:3] = 1e3  # visible patches do not count
    assert float(mae.forward_loss(images, garbage, mask)) == pytest.approx(float(expected), rel=1e-5)

    target_pixels = torch.zeros(1, 2, 2, 2)
    pred_pixels = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 8.0]]]])
    pixel_mask = torch.tensor([[[True, False], [False, True]]])
    assert float(masked_l1(pred_pixels, target_pixels, pixel_mask)) == pytest.approx((1 + 4 + 1 + 8) / 4)

    mfm = build_objective(MFMConfig(radius=2), tiny_vit(32))
    removed = mfm.removed_bins(images)
    pred_image = torch.randn(1, 2, 32, 32)
    distance = (spectrum(pred_image, 2) - spectrum(images, 2)).pow(2).sum(-1).sqrt()  # (1, 2, 32, 32)
    expected = distance[removed.unsqueeze(1).expand_as(distance)].mean()  # plain |F_pred - F_true| (official)
    assert float(mfm.forward_loss(images, pred_image, removed)) == pytest.approx(float(expected), rel=1e-5)
    squared = build_objective(MFMConfig(radius=2, loss_gamma=2.0), tiny_vit(32))
    expected = distance.pow(2)[removed.unsqueeze(1).expand_as(distance)].mean()
    assert float(squared.forward_loss(images, pred_image, removed)) == pytest.approx(float(expected), rel=1e-5)


def test_fremae_target_norm_changes_the_targets_only(swinunetr):
    """``target_norm`` off: the targets are the image and its pooled copy (the paper's
    losses, pinned by hand above). On: the same model and predictions, each band's loss
    against the standardised target, so a per-(sample, modality) scale and shift of the
    image leaves the losses unchanged; the held-out zero-prediction baseline follows."""
    from medtune.pretrain.frequency import band_focal_loss, standardised_band_target

    torch.manual_seed(0)
    backbone = swinunetr(2, 32)
    plain = build_objective(FreMAEConfig(radius=2, decoder_width=8), backbone)
    normed = build_objective(FreMAEConfig(radius=2, decoder_width=8, target_norm=True), backbone)
    assert plain.state_dict().keys() == normed.state_dict().keys()
    normed.load_state_dict(plain.state_dict())
    images = blobs(2, (32, 32))["image"]
    pooled = torch.nn.functional.avg_pool2d(images, 4)
    target_high, target_low = plain.target_images(images)
    assert torch.equal(target_high, images) and torch.equal(target_low, pooled)
    with torch.no_grad():
        pred_high, pred_low = plain.forward_decoder(plain.forward_encoder(images), (32, 32), images)
        _, plain_high, plain_low = plain.forward_loss(images, pred_high, pred_low)
        total, high, low = normed.forward_loss(images, pred_high, pred_low)
        a = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
        b = torch.tensor([-1.0, 3.0]).view(1, 2, 1, 1)
        _, high_affine, low_affine = normed.forward_loss(a * images + b, pred_high, pred_low)
        zero_high, zero_low = normed.zero_prediction_losses(images)
    assert float(plain_high) == pytest.approx(float(band_focal_loss(pred_high, images, 2, keep="high")), rel=1e-6)
    expected_high = band_focal_loss(pred_high, standardised_band_target(images, 2, keep="high"), 2, keep="high")
    expected_low = band_focal_loss(pred_low, standardised_band_target(pooled, 2, keep="low"), 2, keep="low")
    assert float(high) == pytest.approx(float(expected_high), rel=1e-5)
    assert float(low) == pytest.approx(float(expected_low), rel=1e-5)
    assert float(total) == pytest.approx(float(high + 1.3 * low), rel=1e-5)
    assert float(high) != pytest.approx(float(plain_high), rel=1e-2)
    assert float(high_affine) == pytest.approx(float(high), rel=1e-4)
    assert float(low_affine) == pytest.approx(float(low), rel=1e-4)
    zero = torch.zeros_like(images)
    assert float(zero_high) == pytest.approx(
        float(band_focal_loss(zero, standardised_band_target(images, 2, keep="high"), 2, keep="high")), rel=1e-5)
    assert float(zero_low) > 0
    with pytest.raises(ValueError, match="target_norm"):
        FreMAEConfig(target_norm=True, loss="pixel")
