"""Training-time augmentation with MONAI transforms: the ``data.augment`` config section.

::

    data:
      augment:                  # null: no augmentation
        flip_prob: 0.5          # each spatial axis flipped with this probability
        intensity_scale: 0.1    # each channel x (1 + U(-0.1, 0.1))
        intensity_shift: 0.1    # each channel + U(-0.1, 0.1)
        rotation: 15            # options (off by default): RandAffine, gamma, noise, blur
        affine_prob: 0.2

The defaults are the official FreMIM (and TransBTS) pipeline: random flips on every
axis and a per-channel intensity scale and shift of 0.1. The options are nnU-Net's
augmentations, off unless their probability is set; nnU-Net's own values are given in
each field's comment. Samples are augmented in the dataset's ``__getitem__``, i.e. on
the DataLoader workers: 2D slices in 2D, 3D crops in 3D. Label maps and foreground
masks follow the spatial transforms (nearest interpolation); intensity transforms touch
the image only.

Randomness is a function of ``(seed, epoch, index)`` (the datasets pass
:func:`sample_seed`), like crop positions: a sample is augmented the same way in every
run, in every worker layout, and again after ``--resume``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform


@dataclass
class AugmentConfig:
    """Random transforms applied to training samples (2D slices or 3D crops)."""

    flip_prob: float = 0.5
    """Probability of flipping each spatial axis (FreMIM, nnU-Net: 0.5)."""
    intensity_scale: float = 0.1
    """Each channel is multiplied by ``1 + U(-s, s)`` (FreMIM: 0.1; 0: off)."""
    intensity_shift: float = 0.1
    """``U(-s, s)`` is added to each channel (FreMIM: 0.1, in units of the normalised data; 0: off)."""
    intensity_prob: float = 1.0
    """Probability of the scale and of the shift (FreMIM: always)."""
    intensity_per: str = "channel"
    """Draw the scale and shift per ``channel`` (MONAI's channel-wise transforms) or per
    ``column``: per channel and per index along the second spatial axis, as the official
    FreMIM and Med-Tuning code does (its factors have shape (1, W, 1, C) on H x W x D x C)."""
    rotation: float = 0.0
    """Rotation by ``U(-r, r)`` degrees (RandAffine; nnU-Net: 180 for 2D, 30 for 3D)."""
    rotate_in_plane: bool = True
    """3D crops rotate and scale only in the slice plane (about the slice axis), as nnU-Net
    does for anisotropic data and slice-wise models want; false: about every axis."""
    scale: float = 0.0
    """Zoom by ``U(1 - s, 1 + s)`` (RandAffine; nnU-Net: 0.7..1.4, i.e. about 0.3)."""
    affine_prob: float = 0.2
    """Probability of the rotation/zoom when ``rotation`` or ``scale`` is set (nnU-Net: 0.2)."""
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    """Range of the gamma exponent (contrast), statistics retained (nnU-Net: 0.7..1.5)."""
    gamma_prob: float = 0.0
    """Probability of the gamma transform (nnU-Net: 0.3; 0: off)."""
    noise_std: float = 0.1
    """Gaussian noise of std ``U(0, noise_std)`` (nnU-Net: 0.1)."""
    noise_prob: float = 0.0
    """Probability of the noise (nnU-Net: 0.1; 0: off)."""
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Range of the Gaussian blur's sigma in voxels (nnU-Net: 0.5..1.0)."""
    blur_prob: float = 0.0
    """Probability of the blur (nnU-Net: 0.2; 0: off)."""

    def __post_init__(self) -> None:
        for name in ("flip_prob", "intensity_prob", "affine_prob", "gamma_prob", "noise_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.augment.{name} must lie in [0, 1], got {value}")
        for name in ("intensity_scale", "intensity_shift", "rotation", "scale", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.intensity_per not in ("channel", "column"):
            raise ValueError(f"data.augment.intensity_per must be channel or column, got {self.intensity_per!r}")
        if self.scale >= 1.0:
            raise ValueError(f"data.augment.scale must be below 1 (zoom 1 - s .. 1 + s), got {self.scale}")
        for name in ("gamma", "blur_sigma"):
            pair = getattr(self, name)
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ValueError(f"data.augment.{name} must be [low, high] with 0 < low <= high, got {pair}")


class RandColumnScaleShiftd(RandomizableTransform, MapTransform):
    """``x * (1 + U(-scale, scale)) + U(-shift, shift)`` with the factors drawn per channel
    and per index along the second spatial axis: the official FreMIM / Med-Tuning
    intensity jitter, which MONAI's channel-wise transforms do not draw this finely. A
    MONAI randomizable transform, seeded like the others (``set_random_state``)."""

    def __init__(self, keys, scale: float, shift: float, prob: float = 1.0) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.scale, self.shift = float(scale), float(shift)

    def __call__(self, data):
        import torch

        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            image = out[key]  # (C, A, B[, D])
            shape = (image.shape[0], 1, image.shape[2]) + (1,) * (image.ndim - 3)
            scale = torch.as_tensor(1.0 + self.R.uniform(-self.scale, self.scale, size=shape), dtype=image.dtype)
            shift = torch.as_tensor(self.R.uniform(-self.shift, self.shift, size=shape), dtype=image.dtype)
            out[key] = image * scale + shift
        return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` (a 32-bit int for MONAI)."""
    return int(np.random.SeedSequence([seed, epoch, index, 0xA06]).generate_state(1)[0])


class Augmenter:
    """The transforms of an :class:`AugmentConfig` for samples of ``spatial_dims`` dims.

    ``augmenter(sample, seed)`` takes ``{"image": (M, *S) float32, "label": (*S) int,
    "foreground": (*S) bool}`` (label and foreground optional) and returns the same keys
    as torch tensors of the same dtypes and shapes.
    """

    def __init__(self, cfg: AugmentConfig, spatial_dims: int) -> None:
        from monai.transforms import Compose

        if spatial_dims not in (2, 3):
            raise ValueError(f"augmentation works on 2D or 3D samples, got spatial_dims={spatial_dims}")
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        self.transforms = Compose(self._transforms())

    @property
    def active(self) -> bool:
        return len(self.transforms.transforms) > 0

    def _transforms(self) -> list:
        from monai.transforms import (
            RandAdjustContrastd,
            RandAffined,
            RandFlipd,
            RandGaussianNoised,
            RandGaussianSmoothd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        cfg, dims = self.cfg, self.spatial_dims
        spatial = ["image", "label", "foreground"]
        out: list = []
        if cfg.affine_prob > 0 and (cfg.rotation > 0 or cfg.scale > 0):
            angle = math.radians(cfg.rotation)
            in_plane = dims == 3 and cfg.rotate_in_plane
            # MONAI's 3D rotate_range is about axes (0, 1, 2): about the last (slice) axis only = in-plane
            rotate = (angle,) if dims == 2 else ((0.0, 0.0, angle) if in_plane else (angle,) * 3)
            zoom = (cfg.scale,) * 2 + ((0.0,) if in_plane else (cfg.scale,)) * (dims - 2)
            out.append(RandAffined(
                spatial, prob=cfg.affine_prob, rotate_range=rotate, scale_range=zoom,
                mode=("bilinear", "nearest", "nearest"), padding_mode="zeros", allow_missing_keys=True,
            ))
        if cfg.flip_prob > 0:
            out += [RandFlipd(spatial, prob=cfg.flip_prob, spatial_axis=axis, allow_missing_keys=True)
                    for axis in range(dims)]
        if cfg.noise_prob > 0:
            out.append(RandGaussianNoised("image", prob=cfg.noise_prob, std=cfg.noise_std))
        if cfg.blur_prob > 0:
            sigma = tuple(cfg.blur_sigma)
            out.append(RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=cfg.blur_prob))
        jitter = (cfg.intensity_scale > 0 or cfg.intensity_shift > 0) and cfg.intensity_prob > 0
        if jitter and cfg.intensity_per == "column":
            out.append(RandColumnScaleShiftd("image", cfg.intensity_scale, cfg.intensity_shift, cfg.intensity_prob))
        elif jitter:
            if cfg.intensity_scale > 0:
                out.append(RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob,
                                               channel_wise=True))
            if cfg.intensity_shift > 0:
                out.append(RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob,
                                               channel_wise=True))
        if cfg.gamma_prob > 0:
            out.append(RandAdjustContrastd("image", prob=cfg.gamma_prob, gamma=tuple(cfg.gamma), retain_stats=True))
        return out

    def __call__(self, sample: dict[str, Any], seed: int) -> dict[str, Any]:
        import torch
        from monai.data.meta_obj import get_track_meta, set_track_meta
        from monai.utils import convert_to_tensor

        dtypes = {key: torch.as_tensor(np.asarray(value)).dtype for key, value in sample.items()}
        data: dict[str, Any] = {"image": torch.as_tensor(np.ascontiguousarray(sample["image"]), dtype=torch.float32)}
        for key in ("label", "foreground"):  # spatial maps: a channel axis, float for the resampler
            if key in sample:
                data[key] = torch.as_tensor(np.ascontiguousarray(sample[key]))[None].float()
        # one random stream per sample, shared by the transforms in order: reseeding each
        # transform would cost a RandomState apiece; MetaTensor bookkeeping is switched off
        # (nothing is inverted), which makes a 2D slice several times cheaper
        state = np.random.RandomState(seed)
        for transform in self.transforms.transforms:
            transform.set_random_state(state=state)
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            out = self.transforms(data)
        finally:
            set_track_meta(tracking)
        result = {"image": convert_to_tensor(out["image"], track_meta=False).float().contiguous()}
        for key in ("label", "foreground"):
            if key in out:
                value = convert_to_tensor(out[key], track_meta=False)[0]
                result[key] = (value > 0.5 if dtypes[key] == torch.bool else torch.round(value)).to(dtypes[key]).contiguous()
        for key, value in sample.items():
            result.setdefault(key, torch.as_tensor(np.asarray(value)))
        return result


__all__ = ["AugmentConfig", "Augmenter", "RandColumnScaleShiftd", "sample_seed"]
