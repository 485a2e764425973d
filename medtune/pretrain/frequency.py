"""Frequency-domain building blocks of FreMAE and MFM: spectra, band masks, focal loss.

Everything here works for 2D and 3D alike: a tensor is ``(B, C, *S)`` and the spectrum is
taken over the last ``spatial_dims`` axes only (``S = (H, W)`` or ``(H, W, D)``).

Conventions
-----------
- A spectrum is ``fftshift(fftn(x, norm="ortho"))`` over the spatial axes, returned as
  real numbers with (real, imag) stacked on a new last axis: ``(B, C, *S, 2)``. ``ortho``
  makes the transform unitary, so spectrum energy equals image energy (Parseval).
- After ``fftshift`` the zero frequency of an axis of length ``n`` sits at index
  ``n // 2`` for even and odd ``n``; band masks are centred there.
- The "central square of half-width r" (``kind="square"``, the default) holds the bins
  with ``|k - n//2| <= r`` on every axis, i.e. ``2r + 1`` bins per axis (a cube in 3D).
  The official FreMIM code zeroes the slice ``[n//2 - r, n//2 + r)``, ``2r`` bins, which
  drops the highest positive frequency of the band and so breaks conjugate symmetry;
  medtune uses the symmetric square, and ``kind="square_official"`` gives the official
  ``2r``-bin square (``-r <= k - n//2 < r``) for exact reproductions.
- The circle (ball in 3D) keeps ``sum_k (k - n//2)^2 < r^2`` (strict, as MFM's official
  mask: 793 bins at r = 16 on a 224 x 224 grid).
- The training loss (:func:`band_focal_loss`) gets the same value from half the work: the
  spectra are linear, so it transforms the difference ``pred - target`` once, and that
  difference is real, so its spectrum is Hermitian (``F(-k) = conj F(k)``, equal
  distances at ``k`` and ``-k``) and the real FFT's half spectrum holds every distance;
  each half bin is counted as often as it and its mirror lie in the band
  (:func:`half_band_count`), which also serves bands that are not symmetric
  (``square_official``).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FilterKind = Literal["square", "square_official", "circle"]
FILTER_KINDS = ("square", "square_official", "circle")
BandKeep = Literal["low", "high"]


def spatial_axes(spatial_dims: int) -> tuple[int, ...]:
    """The last ``spatial_dims`` axes, e.g. ``(-2, -1)`` for 2D."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return tuple(range(-spatial_dims, 0))


def fft_input(x: Tensor) -> Tensor:
    """``x`` in float32, as complex on CPU: there PyTorch's FFT of a real tensor fills the
    conjugate half of the spectrum slowly (the whole real-input ``fftn`` of a
    ``(4, 48, 128, 128)`` map takes ~5x a complex one); a complex input gives the same
    spectrum. The complex copy is laid out contiguously, as the CPU FFT over the spatial
    axes is about 2x slower on a channels-last map. GPUs keep the real input (cuFFT's real
    transform is the cheaper one)."""
    x = x.float()  # no bf16/half FFT on CPU, and poor accuracy in fp16 anyway
    return x.to(torch.complex64, memory_format=torch.contiguous_format) if x.device.type == "cpu" else x


def spectrum(x: Tensor, spatial_dims: int) -> Tensor:
    """Centred orthonormal spectrum of ``x`` over its spatial axes.

    Args:
        x: ``(B, C, *S)`` real tensor.
        spatial_dims: number of trailing spatial axes (2 or 3).

    Returns:
        ``(B, C, *S, 2)`` float tensor, (real, imag) on the last axis.
    """
    axes = spatial_axes(spatial_dims)
    freq = torch.fft.fftshift(torch.fft.fftn(fft_input(x), dim=axes, norm="ortho"), dim=axes)
    return torch.view_as_real(freq)


def inverse_spectrum(spec: Tensor, spatial_dims: int) -> Tensor:
    """Image of a (band-limited) centred spectrum: the inverse of :func:`spectrum`.

    ``(B, C, *S, 2) -> (B, C, *S)``, the real part of ``ifftn(ifftshift(F))``.
    """
    axes = spatial_axes(spatial_dims)
    freq = torch.fft.ifftshift(torch.view_as_complex(spec.contiguous()), dim=axes)
    return torch.fft.ifftn(freq, dim=axes, norm="ortho").real


def band_mask(
    shape: Sequence[int],
    radius: float,
    kind: FilterKind = "square",
    keep: BandKeep = "low",
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask over a centred (fftshifted) spectrum of spatial size ``shape``.

    Args:
        shape: spatial size ``S`` of the spectrum, e.g. ``(H, W)`` or ``(H, W, D)``.
        radius: half-width ``r`` of the central square, or radius of the circle, in bins.
        kind: ``"square"`` (``max_k |k - n_k//2| <= r``), ``"square_official"``
            (FreMIM's slice: ``-r <= k - n_k//2 < r`` on every axis) or ``"circle"``
            (``sum_k (k - n_k//2)^2 < r^2``, strict as in MFM).
        keep: ``"low"`` keeps the central region, ``"high"`` its complement; the two
            partition the spectrum.

    Returns:
        ``S``-shaped bool tensor, True where a bin is kept.
    """
    if kind not in FILTER_KINDS:
        raise ValueError(f"band kind must be one of {FILTER_KINDS}, got {kind!r}")
    if keep not in ("low", "high"):
        raise ValueError(f"band keep must be 'low' or 'high', got {keep!r}")
    # Offsets of each bin from the zero frequency (index n//2 after fftshift), per axis,
    # broadcast against each other: ``(n_0, 1, 1)``, ``(1, n_1, 1)``, ...
    offsets = []
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        offsets.append((torch.arange(n, device=device) - n // 2).view(view))
    if kind == "square":
        central = torch.stack(torch.broadcast_tensors(*[o.abs() for o in offsets])).amax(0) <= radius
    elif kind == "square_official":
        inside = [(o >= -radius) & (o < radius) for o in offsets]
        central = torch.stack(torch.broadcast_tensors(*inside)).all(0)
    else:
        central = sum(o.float() ** 2 for o in offsets) < float(radius) ** 2
    return central if keep == "low" else ~central


def apply_band(spec: Tensor, mask: Tensor) -> Tensor:
    """Zero the bins of ``spec`` ``(B, C, *S, 2)`` where ``mask`` ``(*S)`` is False."""
    return spec * mask.unsqueeze(-1).to(spec.dtype)


def high_band(
    x: Tensor, radius: float, kind: FilterKind = "square", spatial_dims: int | None = None
) -> Tensor:
    """High-frequency target: the spectrum of ``x`` without its central region.

    Args:
        x: ``(B, C, *S)`` image (``spatial_dims`` defaults to ``x.ndim - 2``).

    Returns:
        ``(B, C, *S, 2)`` spectrum with the central square/circle of radius ``r`` zeroed.
    """
    spatial_dims = x.ndim - 2 if spatial_dims is None else spatial_dims
    spec = spectrum(x, spatial_dims)
    return apply_band(spec, band_mask(x.shape[-spatial_dims:], radius, kind, "high", x.device))


def low_band(
    x: Tensor,
    radius: float,
    pool: int = 4,
    kind: FilterKind = "square",
    spatial_dims: int | None = None,
) -> Tensor:
    """Low-frequency target: average-pool ``x`` by ``pool``, keep the central region.

    Args:
        x: ``(B, C, *S)`` image. With ``pool=1`` no pooling is done, which is how the
            decoder's low-band prediction (already at ``S / pool``) is filtered.

    Returns:
        ``(B, C, *S/pool, 2)`` spectrum of the pooled image, zero outside the central
        square/circle of radius ``r``.
    """
    spatial_dims = x.ndim - 2 if spatial_dims is None else spatial_dims
    if pool > 1:
        avg_pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial_dims - 1]
        x = avg_pool(x, kernel_size=pool, stride=pool)
    spec = spectrum(x, spatial_dims)
    return apply_band(spec, band_mask(x.shape[-spatial_dims:], radius, kind, "low", x.device))


def focal_weight(pred_spec: Tensor, target_spec: Tensor, alpha: float = 1.0) -> Tensor:
    """Spectrum weight matrix of the focal frequency loss (detached, in ``[0, 1]``).

    ``w = log(1 + d^alpha)`` with ``d = |F_pred - F_true|`` per bin, divided by its maximum
    over the bins of each (sample, channel); bins where the maximum is 0 get weight 0.

    Args:
        pred_spec, target_spec: ``(B, C, *S, 2)`` spectra.

    Returns:
        ``(B, C, *S)`` weights, no gradient.
    """
    with torch.no_grad():
        return _focal_weight_of_squared_distance((pred_spec - target_spec).pow(2).sum(-1), alpha)


def _focal_weight_of_squared_distance(squared_distance: Tensor, alpha: float) -> Tensor:
    """:func:`focal_weight` from ``d^2`` ``(B, C, *S)`` (no gradient)."""
    with torch.no_grad():
        weight = torch.log1p(squared_distance.sqrt().pow(alpha))  # log(1 + d^alpha)
        peak = weight.flatten(2).amax(-1)  # (B, C)
        peak = peak.view(*peak.shape, *([1] * (weight.ndim - 2)))
        weight = torch.where(peak > 0, weight / peak.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)
        return weight.clamp(0.0, 1.0)


def focal_frequency_loss(pred_spec: Tensor, target_spec: Tensor, alpha: float = 1.0) -> Tensor:
    """Focal frequency loss (Jiang et al., ICCV 2021) between two spectra.

    ``L = mean(w * d^2)`` over all bins, samples and channels, where ``d^2`` is the squared
    distance of the complex bins and ``w`` is :func:`focal_weight` (detached), which
    focuses the loss on the frequencies that are currently hardest.

    Args:
        pred_spec, target_spec: ``(B, C, *S, 2)`` spectra (see :func:`spectrum`).

    Returns:
        scalar loss.
    """
    if pred_spec.shape != target_spec.shape:
        raise ValueError(
            f"focal_frequency_loss: pred spectrum {tuple(pred_spec.shape)} and target "
            f"spectrum {tuple(target_spec.shape)} differ"
        )
    squared_distance = (pred_spec - target_spec).pow(2).sum(-1)  # (B, C, *S)
    weight = _focal_weight_of_squared_distance(squared_distance.detach(), alpha)
    return (weight * squared_distance).mean()


def half_band_count(
    shape: Sequence[int],
    radius: float,
    kind: FilterKind = "square",
    keep: BandKeep = "low",
    device: torch.device | str | None = None,
) -> Tensor:
    """How many bins of a band each bin of a real signal's half spectrum stands for.

    ``rfftn`` keeps the bins ``k`` of the last axis up to ``n // 2``; a dropped bin is the
    mirror ``-k`` of a kept one, with the conjugate value. A kept bin whose mirror was
    dropped counts ``band(k) + band(-k)`` (0, 1 or 2), a kept bin whose mirror is kept too
    (last-axis index 0, or ``n / 2`` for even ``n``) counts ``band(k)``; so a sum over the
    band of any function of ``|F|`` equals the half spectrum's sum weighted by this count.

    Args:
        shape: spatial size ``S`` of the full spectrum; ``radius``, ``kind``, ``keep`` as
            :func:`band_mask`.

    Returns:
        ``(*S[:-1], S[-1] // 2 + 1)`` float32 counts, in the unshifted (``rfftn``) order.
    """
    axes = tuple(range(len(shape)))
    band = torch.fft.ifftshift(band_mask(shape, radius, kind, keep, device), dim=axes)  # bin k at index k mod n
    mirror = torch.roll(torch.flip(band, axes), shifts=(1,) * len(shape), dims=axes)  # band(-k)
    n = shape[-1]
    half = n // 2 + 1
    count = band[..., :half].float() + mirror[..., :half].float()
    self_paired = [0, n // 2] if n % 2 == 0 else [0]
    count[..., self_paired] = band[..., self_paired].float()
    return count


def band_focal_loss(
    pred: Tensor,
    target: Tensor,
    radius: float,
    kind: FilterKind = "square",
    keep: BandKeep = "low",
    alpha: float = 1.0,
    spatial_dims: int | None = None,
) -> Tensor:
    """Focal frequency loss between the ``keep`` bands of two images' spectra.

    Equals ``focal_frequency_loss(apply_band(spectrum(pred), m), apply_band(spectrum(target), m))``
    with ``m = band_mask(S, radius, kind, keep)`` (to float rounding), from one real FFT of
    ``pred - target`` over half the bins (weighted by :func:`half_band_count`): no target
    spectrum, no shift, no (real, imag) stack.

    Args:
        pred, target: ``(B, C, *S)`` real images (``spatial_dims`` defaults to ``ndim - 2``);
            computed in float32.

    Returns:
        scalar loss (the mean over the full spectrum's bins, samples and channels).
    """
    if pred.shape != target.shape:
        raise ValueError(f"band_focal_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    spatial_dims = pred.ndim - 2 if spatial_dims is None else spatial_dims
    axes = spatial_axes(spatial_dims)
    difference = torch.fft.rfftn(pred.float() - target.float(), dim=axes, norm="ortho")  # (B, C, *S[:-1], n//2+1)
    squared_distance = difference.real.square() + difference.imag.square()
    count = half_band_count(pred.shape[-spatial_dims:], radius, kind, keep, pred.device)
    with torch.no_grad():
        # The focal weight's per-(sample, channel) peak runs over the band's bins only.
        coefficient = _focal_weight_of_squared_distance(squared_distance * (count > 0), alpha) * count
    return (coefficient * squared_distance).sum() / pred.numel()


def standardised_band_target(
    x: Tensor,
    radius: float,
    kind: FilterKind = "square",
    keep: BandKeep = "low",
    spatial_dims: int | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """``x`` shifted and scaled per (sample, channel) so that its ``keep`` band has no
    zero-frequency bin and an energy of 1 per pixel, i.e. (for a symmetric band, whose
    image is real) the band as an image has mean 0 and variance 1: the frequency
    counterpart of MAE's normalised pixel targets (each slice's band counts alike,
    whatever its contrast).

    The band is linear, so the band of ``(x - mean(x)) / s`` is ``(band(x) - mean) / s``:
    the mean only lives in the zero-frequency bin (inside the low band, never in the high
    band). ``s^2`` is the band's energy without its zero bin over the pixel count (by
    Parseval the band image's variance); ``eps`` (as MAE's 1e-6) keeps a flat slice finite.

    Args:
        x: ``(B, C, *S)`` real images (``spatial_dims`` defaults to ``ndim - 2``);
            ``radius``, ``kind``, ``keep`` as :func:`band_mask`.

    Returns:
        ``(B, C, *S)`` float32, the target whose ``keep`` band is standardised.
    """
    spatial_dims = x.ndim - 2 if spatial_dims is None else spatial_dims
    axes = spatial_axes(spatial_dims)
    centred = x.float() - x.float().mean(dim=axes, keepdim=True)
    half = torch.fft.rfftn(centred, dim=axes, norm="ortho")  # (B, C, *S[:-1], n//2+1)
    count = half_band_count(x.shape[-spatial_dims:], radius, kind, keep, x.device)
    energy = ((half.real.square() + half.imag.square()) * count).sum(dim=axes, keepdim=True)
    variance = energy / x.shape[-spatial_dims:].numel()
    return centred / (variance + eps).sqrt()


def frequency_distance(pred_spec: Tensor, target_spec: Tensor, gamma: float = 1.0, eps: float = 1e-12) -> Tensor:
    """MFM's frequency distance ``(|F_pred - F_true|^2 + eps)^(gamma / 2)`` per bin.

    ``gamma`` 1 is the plain distance (official MFM), 2 the squared one; ``eps`` (official
    1e-12) keeps the gradient finite where the spectra agree.

    Args:
        pred_spec, target_spec: ``(B, C, *S, 2)`` spectra.

    Returns:
        ``(B, C, *S)``.
    """
    squared = (pred_spec - target_spec).pow(2).sum(-1)  # (B, C, *S)
    return (squared + eps).sqrt().pow(gamma)


class GlobalFilter(nn.Module):
    """Learnable global filter in the frequency domain: ``x' = |IFFT(FFT(x) * W + B)| + x``.

    ``W`` and ``B`` are real, one value per channel and frequency bin, initialised to 1
    (as in FreMIM). They are stored for the frequency grid of ``spatial_size``; an input
    of another spatial size uses ``W`` and ``B`` resampled (linear interpolation) to its
    grid, so the filter works for any size while keeping the trained weights' meaning
    (a smooth transfer function over normalised frequency).

    Args:
        channels: ``C`` of the input.
        spatial_size: ``S`` for which ``W`` and ``B`` are stored (e.g. the image size for
            the high-band path, image size / 4 for the low-band path).
        spatial_dims: 2 or 3.

    Shapes: ``(B, C, *S') -> (B, C, *S')`` for any ``S'``.
    """

    def __init__(self, channels: int, spatial_size: Sequence[int], spatial_dims: int) -> None:
        super().__init__()
        spatial_size = tuple(int(s) for s in spatial_size)
        if len(spatial_size) != spatial_dims:
            raise ValueError(f"spatial_size {spatial_size} does not have {spatial_dims} dims")
        self.spatial_dims = spatial_dims
        self.weight = nn.Parameter(torch.ones(channels, *spatial_size))  # W (C, *S)
        self.bias = nn.Parameter(torch.ones(channels, *spatial_size))  # B (C, *S)

    def _filter_for(self, size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        if tuple(self.weight.shape[1:]) == size:
            return self.weight, self.bias
        mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
        both = torch.stack([self.weight, self.bias])  # (2, C, *S)
        resized = F.interpolate(both, size=size, mode=mode, align_corners=True)
        return resized[0], resized[1]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self._filter_for(tuple(x.shape[-self.spatial_dims :]))
        return global_filter(x.float(), weight, bias, self.spatial_dims).to(x.dtype)


def global_filter(x: Tensor, weight: Tensor, bias: Tensor, spatial_dims: int) -> Tensor:
    """``|IFFT(FFT(x) * W + B)| + x`` over the last ``spatial_dims`` axes (orthonormal FFTs).

    Args:
        x: ``(B, C, *S)`` float32.
        weight, bias: real ``W``, ``B`` broadcastable to ``(C, *S)``.

    Returns:
        ``(B, C, *S)``, with the gradients autograd would give the complex formula
        (``|z|``'s gradient is 0 where ``z = 0``), from a hand-written backward: on a CPU
        PyTorch's complex ``abs`` and its gradient ``sgn`` take several times the FFTs'
        time, and real arithmetic on the (real, imag) parts does not.
    """
    return _GlobalFilterFunction.apply(x, weight, bias, spatial_axes(spatial_dims))


def _magnitude(z: Tensor) -> Tensor:
    """``|z|`` of a complex tensor as ``sqrt(re^2 + im^2)``."""
    parts = torch.view_as_real(z)
    real, imag = parts[..., 0], parts[..., 1]
    return torch.addcmul(real * real, imag, imag).sqrt_()


class _GlobalFilterFunction(torch.autograd.Function):
    """:func:`global_filter`. Backward, for ``z = IFFT(F W + B)``, ``F = FFT(x)`` and the
    output's gradient ``g``: ``g_z = g z / |z|``, ``G = FFT(g_z)`` (the adjoint of the
    orthonormal IFFT), ``dW = Re(G conj(F))``, ``dB = Re(G)`` (summed to their shapes),
    ``dx = Re(IFFT(G W)) + g``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, axes: tuple[int, ...]) -> Tensor:
        freq = torch.fft.fftn(fft_input(x), dim=axes, norm="ortho")  # (B, C, *S) complex
        spec = freq * weight
        spec.real.add_(bias)
        z = torch.fft.ifftn(spec, dim=axes, norm="ortho")
        magnitude = _magnitude(z)
        ctx.save_for_backward(freq, weight, z, magnitude)
        ctx.axes = axes
        ctx.bias_shape = bias.shape
        return x + magnitude  # in x's memory layout (a 1x1 conv's gradient is 4x slower in another)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        freq, weight, z, magnitude = ctx.saved_tensors
        scale = (grad / magnitude).masked_fill_(magnitude == 0, 0.0)
        grad_spec = torch.fft.fftn(z * scale, dim=ctx.axes, norm="ortho")
        grad_weight = torch.real(grad_spec * freq.conj()).sum_to_size(weight.shape)
        # contiguous: a copy when no sum was needed (the view would see the in-place W below)
        grad_bias = grad_spec.real.sum_to_size(ctx.bias_shape).contiguous()
        grad_x = grad + torch.fft.ifftn(grad_spec.mul_(weight), dim=ctx.axes, norm="ortho").real
        return grad_x, grad_weight, grad_bias, None


def mfm_radius(size: Sequence[int], radius_at_224: float = 16.0) -> float:
    """MFM's band radius for an image of spatial size ``size``: 16 bins at 224 px, scaled
    linearly with the smallest side (e.g. 4.57 at 64 px)."""
    return radius_at_224 * min(size) / 224.0


__all__ = [
    "spatial_axes",
    "spectrum",
    "inverse_spectrum",
    "band_mask",
    "apply_band",
    "high_band",
    "low_band",
    "focal_weight",
    "focal_frequency_loss",
    "half_band_count",
    "band_focal_loss",
    "standardised_band_target",
    "frequency_distance",
    "GlobalFilter",
    "global_filter",
    "mfm_radius",
]
