"""Frequency math of FreMAE/MFM against hand-worked cases and identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medtune.pretrain.frequency import (
    GlobalFilter,
    apply_band,
    band_mask,
    focal_frequency_loss,
    focal_weight,
    high_band,
    inverse_spectrum,
    low_band,
    mfm_radius,
    spectrum,
)


def test_square_band_8x8_radius_2_by_hand():
    low = band_mask((8, 8), 2, "square", "low")
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:7, 2:7] = True  # centre 8 // 2 = 4, |k - 4| <= 2 -> 2..6
    assert torch.equal(low, expected)
    high = band_mask((8, 8), 2, "square", "high")
    assert torch.equal(high, ~expected)
    assert int(low.sum()) == 25 and int(high.sum()) == 64 - 25


def test_official_square_is_freemim_slice():
    """``square_official``: FreMIM's ``[n//2 - r, n//2 + r)`` slice, 2r bins per axis."""
    low = band_mask((8, 8), 2, "square_official", "low")
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True  # 8 // 2 - 2 = 2 up to (not including) 8 // 2 + 2 = 6
    assert torch.equal(low, expected)
    assert torch.equal(band_mask((8, 8), 2, "square_official", "high"), ~expected)
    assert int(band_mask((8, 8, 8), 2, "square_official", "low").sum()) == 4**3
    # the official high band: fftshift(fft2(x)) with the centre slice set to zero
    x = torch.randn(2, 3, 16, 16)
    official = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))
    official[:, :, 8 - 3 : 8 + 3, 8 - 3 : 8 + 3] = 0
    assert torch.allclose(high_band(x, 3, "square_official"), torch.view_as_real(official), atol=1e-6)
    with pytest.raises(ValueError, match="band kind"):
        band_mask((8, 8), 2, "diamond")


def test_square_band_odd_size_centre_like_fftshift():
    low = band_mask((7, 5), 1, "square", "low")
    expected = torch.zeros(7, 5, dtype=torch.bool)
    expected[2:5, 1:4] = True  # centres 3 and 2
    assert torch.equal(low, expected)
    # fftshift puts the zero frequency at n // 2 for even and odd n: the spectrum of a
    # constant image is a single bin there, which the r=0 low band keeps exactly.
    for shape in [(8, 8), (7, 5), (6, 5, 3)]:
        const = torch.ones(1, 1, *shape)
        spec = spectrum(const, len(shape))
        dc_only = band_mask(shape, 0, "square", "low")
        assert int(dc_only.sum()) == 1
        assert torch.allclose(apply_band(spec, dc_only), spec, atol=1e-5)
        centre = (0, 0) + tuple(n // 2 for n in shape) + (0,)
        assert spec[centre] == pytest.approx(math.sqrt(math.prod(shape)), rel=1e-5)


def test_circle_band_by_hand_2d_and_3d():
    """Strictly inside the circle, as MFM's mask: dx^2 + dy^2 < r^2."""
    low = band_mask((8, 8), 2, "circle", "low")
    offsets = [(dy, dx) for dy in range(-4, 4) for dx in range(-4, 4) if dy * dy + dx * dx < 4]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for dy, dx in offsets:
        expected[4 + dy, 4 + dx] = True
    assert torch.equal(low, expected) and int(low.sum()) == 9
    ball = band_mask((8, 8, 8), 1.5, "circle", "low")
    assert int(ball.sum()) == 19  # centre, 6 face and 12 edge neighbours (distance^2 < 2.25)
    assert bool(ball[4, 4, 4]) and bool(ball[3, 3, 4]) and not bool(ball[3, 3, 3])


@pytest.mark.parametrize("kind", ["square", "circle"])
@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 8), (9, 6, 7)])
def test_high_and_low_bands_partition_the_spectrum(kind, shape):
    low = band_mask(shape, 2, kind, "low")
    high = band_mask(shape, 2, kind, "high")
    assert not (low & high).any() and (low | high).all()
    if kind == "square" and shape == (8, 8, 8):
        assert int(low.sum()) == 125
    x = torch.randn(2, 3, *shape)
    dims = len(shape)
    total = spectrum(x, dims)
    summed = high_band(x, 2, kind) + low_band(x, 2, pool=1, kind=kind)
    assert torch.allclose(summed, total, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 12), (8, 6, 10)])
def test_parseval_and_inverse(shape):
    x = torch.randn(2, 3, *shape)
    spec = spectrum(x, len(shape))
    assert spec.shape == (2, 3, *shape, 2)
    assert float(spec.pow(2).sum()) == pytest.approx(float(x.pow(2).sum()), rel=1e-5)
    assert torch.allclose(inverse_spectrum(spec, len(shape)), x, atol=1e-5)
    # only the spatial axes are transformed: channels stay independent
    single = spectrum(x[:, 1:2], len(shape))
    assert torch.allclose(single, spec[:, 1:2], atol=1e-6)


def test_low_band_pools_then_filters():
    x = torch.randn(2, 4, 32, 32)
    expected = apply_band(spectrum(F.avg_pool2d(x, 4), 2), band_mask((8, 8), 2, "square", "low"))
    assert torch.allclose(low_band(x, 2, pool=4), expected, atol=1e-6)
    x3 = torch.randn(1, 2, 16, 16, 8)
    assert low_band(x3, 1, pool=4).shape == (1, 2, 4, 4, 2, 2)


def test_focal_loss_hand_worked_and_zero_at_target():
    target = torch.zeros(1, 1, 1, 2, 2)
    pred = torch.tensor([[[[[1.0, 0.0], [0.0, 2.0]]]]])  # d = [1, 2]
    # w = log(1 + d) / log(3) = [log 2 / log 3, 1]; L = mean(w * d^2)
    expected = (math.log(2) / math.log(3) * 1.0 + 1.0 * 4.0) / 2
    assert float(focal_frequency_loss(pred, target)) == pytest.approx(expected, rel=1e-6)
    assert float(focal_frequency_loss(target, target)) == 0.0
    spec = spectrum(torch.randn(2, 3, 8, 8), 2)
    assert float(focal_frequency_loss(spec, spec)) == 0.0
    assert torch.equal(focal_weight(spec, spec), torch.zeros(2, 3, 8, 8))


def test_focal_loss_grows_with_error_and_weights_are_bounded():
    target = spectrum(torch.randn(2, 3, 8, 8), 2)
    noise = torch.randn_like(target)
    losses = [float(focal_frequency_loss(target + s * noise, target)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert losses == sorted(losses) and losses[0] > 0
    weight = focal_weight(target + noise, target)
    assert weight.min() >= 0 and weight.max() <= 1
    # normalised per (sample, channel): each has its maximum at exactly 1
    assert torch.allclose(weight.flatten(2).amax(-1), torch.ones(2, 3))


def test_focal_weight_is_detached():
    target = spectrum(torch.randn(1, 2, 6, 6), 2)
    pred = (target + torch.randn_like(target)).requires_grad_(True)
    focal_frequency_loss(pred, target).backward()
    weight = focal_weight(pred.detach(), target)
    # d/dpred mean(w * |pred - target|^2) with w constant = 2 w (pred - target) / N
    expected = 2 * weight.unsqueeze(-1) * (pred.detach() - target) / weight.numel()
    assert torch.allclose(pred.grad, expected, atol=1e-6)
    assert not focal_weight(pred, target).requires_grad


def test_global_filter_at_init_by_hand():
    # W = B = 1: IFFT(FFT(x) * 1 + 1) = x + IFFT(ones) = x + sqrt(N) at the origin.
    x = torch.rand(2, 3, 4, 6) + 0.1
    gf = GlobalFilter(3, (4, 6), spatial_dims=2)
    expected = 2 * x.clone()
    expected[..., 0, 0] += math.sqrt(24)
    assert torch.allclose(gf(x), expected, atol=1e-5)
    out = gf(x)
    out.sum().backward()
    assert gf.weight.grad is not None and gf.bias.grad is not None


def test_global_filter_any_size_2d_and_3d():
    gf = GlobalFilter(2, (8, 8, 8), spatial_dims=3)
    for shape in [(8, 8, 8), (4, 6, 10)]:
        x = torch.rand(1, 2, *shape)
        assert gf(x).shape == x.shape
    # at init every resampled W, B is still 1, so the identity above holds at any size
    x = torch.rand(1, 2, 4, 6, 10) + 0.1
    expected = 2 * x.clone()
    expected[..., 0, 0, 0] += math.sqrt(240)
    assert torch.allclose(gf(x), expected, atol=1e-5)
    shared = GlobalFilter(1, (8, 8), spatial_dims=2)
    assert shared(torch.rand(2, 5, 8, 8)).shape == (2, 5, 8, 8)


def test_mfm_radius_scales_with_size():
    assert mfm_radius((224, 224)) == pytest.approx(16.0)
    assert mfm_radius((64, 64, 32)) == pytest.approx(16.0 * 32 / 224)


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (9, 6), (6, 7, 5), (4, 4, 4)])
@pytest.mark.parametrize("kind", ["square", "square_official", "circle"])
@pytest.mark.parametrize("keep", ["low", "high"])
def test_band_focal_loss_equals_the_full_spectrum_loss(shape, kind, keep):
    """One real FFT of the difference over the half spectrum, each half bin counted as
    often as it and its mirror lie in the band: the loss and its gradient are those of
    focal_frequency_loss on the band-filtered full spectra, odd sides and the asymmetric
    official square included."""
    from medtune.pretrain.frequency import band_focal_loss, half_band_count

    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64).requires_grad_()
    target = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)
    mask = band_mask(shape, 2, kind, keep)
    spatial_dims = len(shape)
    full = focal_frequency_loss(
        apply_band(spectrum(pred, spatial_dims), mask), apply_band(spectrum(target, spatial_dims), mask), 1.5
    )
    (full_grad,) = torch.autograd.grad(full, pred)
    pred32 = pred.detach().float().requires_grad_()
    half = band_focal_loss(pred32, target.float(), 2, kind, keep, alpha=1.5)
    (half_grad,) = torch.autograd.grad(half, pred32)
    assert float(half.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(half_grad.double(), full_grad, rtol=1e-4, atol=1e-5 * float(full_grad.abs().max()))
    assert float(half_band_count(shape, 2, kind, keep).sum()) == int(mask.sum())


@pytest.mark.parametrize(("stored", "size"), [((8, 8), (8, 8)), ((7, 5), (7, 5)), ((8, 8), (12, 10)), ((6, 7, 5), (6, 7, 5))])
def test_global_filter_equals_its_full_complex_formula(stored, size):
    """The real-FFT global filter gives |IFFT(FFT(x) W + B)| + x and its gradients, for
    any W, B (not only symmetric ones), odd sides, 3D and resampled filters."""
    from medtune.pretrain.frequency import GlobalFilter, spatial_axes

    torch.manual_seed(0)
    channels = 3
    layer = GlobalFilter(channels, stored, len(stored))
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, channels, *size, requires_grad=True)
    weight, bias = layer._filter_for(size)
    axes = spatial_axes(len(size))
    freq = torch.fft.fftn(x.to(torch.complex64), dim=axes, norm="ortho")
    expected = torch.fft.ifftn(freq * weight + bias, dim=axes, norm="ortho").abs() + x
    got = layer(x)
    assert torch.allclose(got, expected, atol=1e-5)
    inputs = [x, layer.weight, layer.bias]
    expected_grads = torch.autograd.grad((expected * expected.cos()).sum(), inputs)
    grads = torch.autograd.grad((got * got.cos()).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (6, 7, 5)])
@pytest.mark.parametrize("kind", ["square", "square_official", "circle"])
@pytest.mark.parametrize("keep", ["low", "high"])
def test_standardised_band_target_gives_its_band_mean_0_variance_1(shape, kind, keep):
    """The ``keep`` band of the standardised target (from the full shifted spectrum, not
    the half-spectrum shortcut) has no zero-frequency bin and energy 1 per pixel, per
    (sample, channel): as an image, mean 0 and variance 1 (for a symmetric band, whose
    image is real); the target is the centred input scaled per (sample, channel), and a
    scale and shift of a sample's channel does not change it."""
    from medtune.pretrain.frequency import standardised_band_target

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=gen) + 2.0
    dims = len(shape)
    axes = tuple(range(2, 2 + dims))
    mask = band_mask(shape, 2, kind, keep)
    target = standardised_band_target(x, 2, kind, keep, eps=0.0)
    band = apply_band(spectrum(target, dims), mask)  # (2, 3, *S, 2)
    centre = (slice(None), slice(None), *[n // 2 for n in shape])
    assert float(band[centre].abs().max()) < 1e-4
    assert torch.allclose(band.pow(2).flatten(2).sum(-1) / math.prod(shape), torch.ones(2, 3), atol=1e-4)
    if kind != "square_official":
        band_image = inverse_spectrum(band, dims)
        assert torch.allclose(band_image.mean(axes), torch.zeros(2, 3), atol=1e-5)
        assert torch.allclose(band_image.pow(2).mean(axes), torch.ones(2, 3), atol=1e-4)
    # the target is the centred input, scaled per (sample, channel)
    centred = x - x.mean(axes, keepdim=True)
    scale = (centred * target).flatten(2).sum(-1) / centred.flatten(2).pow(2).sum(-1)  # (2, 3)
    assert torch.allclose(target, centred * scale.view(2, 3, *[1] * dims), atol=1e-5)
    a = torch.tensor([0.5, 3.0]).view(2, 1, *[1] * dims)
    b = torch.tensor([1.0, -4.0, 0.3]).view(1, 3, *[1] * dims)
    assert torch.allclose(standardised_band_target(a * x + b, 2, kind, keep, eps=0.0), target, atol=1e-4)


def test_standardised_band_target_keeps_a_flat_image_finite():
    from medtune.pretrain.frequency import standardised_band_target

    flat = torch.full((1, 2, 8, 8), 5.0)
    assert torch.equal(standardised_band_target(flat, 2, keep="high"), torch.zeros_like(flat))
