"""Intensity normalisation by modality: z-score for MRI, nnU-Net's scheme for CT.

Each channel gets a *scheme*:

- ``zscore`` (MRI, the group convention): mean 0 / std 1 over the case's own nonzero
  voxels; background stays 0 (skull-stripped MRI has background exactly 0).
- ``ct`` (nnU-Net's CT normalisation): CT values are absolute (Hounsfield units), so
  one transform serves the whole dataset: clip to the 0.5 and 99.5 percentiles of the
  *foreground* voxels of the training cases, then subtract their mean and divide by
  their std. Foreground = labeled voxels (label > 0, as nnU-Net) of labeled training
  cases; for unlabeled data (pretraining) the body mask (HU above
  ``body_threshold``, -500 by default: air is -1000, fat about -100, lung -500..-900
  lies inside the body's box). The statistics are computed on the training cases only
  and stored in the run (``config.json``), so prediction applies the same transform.
- ``none``: the values as they are.

``data.normalization: auto`` picks ``ct`` for channels named CT in ``dataset.json``
(``modality`` or ``channel_names``) and ``zscore`` for the others; ``zscore``/``ct``/``none``
force one scheme for every channel.

CT background is not 0, so *foreground* (the crop box, FreMAE's mask) is per scheme:
nonzero for ``zscore``/``none`` channels, above ``body_threshold`` for ``ct`` channels.

The cache (:class:`~medtune.data.cache.VolumeCache`) stores ``zscore`` channels
normalised and ``ct`` channels in HU, because CT statistics depend on which cases are
the training ones (a fold) while the cache is shared by every run on the data;
:class:`Normalizer` applies the CT transform to each sample as it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medtune.data.preprocess import zscore_nonzero
from medtune.errors import ConfigError

SCHEMES = ("zscore", "ct", "none")
NORMALIZATIONS = ("auto", *SCHEMES)
DEFAULT_BODY_THRESHOLD = -500.0
SAMPLES_PER_CASE = 10_000  # foreground voxels drawn per case for the CT statistics (as nnU-Net)


def channel_schemes(normalization: str, channel_names: Sequence[str]) -> tuple[str, ...]:
    """One scheme per channel: ``auto`` reads the names (CT -> ``ct``, else ``zscore``)."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if normalization != "auto":
        return tuple(normalization for _ in channel_names)
    return tuple("ct" if str(name).strip().lower() == "ct" else "zscore" for name in channel_names)


def foreground(image: np.ndarray, schemes: Sequence[str], body_threshold: float = DEFAULT_BODY_THRESHOLD,
               mode: str = "all") -> np.ndarray:
    """Voxels that are foreground in all (or any) channels: nonzero, or above
    ``body_threshold`` for CT channels. ``image (M, *S)`` -> ``(*S)`` bool."""
    masks = [image[m] > body_threshold if scheme == "ct" else image[m] != 0 for m, scheme in enumerate(schemes)]
    stacked = np.stack(masks)
    if mode == "all":
        return stacked.all(axis=0)
    if mode == "any":
        return stacked.any(axis=0)
    raise ValueError(f"foreground mode must be 'all' or 'any', got {mode!r}")


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel is normalised; for ``ct``, the training set's foreground statistics."""

    scheme: str = "zscore"
    low: float | None = None  # 0.5 percentile (ct)
    high: float | None = None  # 99.5 percentile (ct)
    mean: float | None = None
    std: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.scheme}
        if self.scheme == "ct":
            out.update(low=self.low, high=self.high, mean=self.mean, std=self.std)
        return out

    @classmethod
    def from_json(cls, data: Any) -> "ChannelNorm":
        if not isinstance(data, dict) or data.get("scheme") not in SCHEMES:
            raise ConfigError(f"not a channel normalisation record: {data!r}")
        norm = cls(data["scheme"], data.get("low"), data.get("high"), data.get("mean"), data.get("std"))
        if norm.scheme == "ct" and None in (norm.low, norm.high, norm.mean, norm.std):
            raise ConfigError(f"a ct normalisation record needs low, high, mean and std: {data!r}")
        return norm


def ct_statistics(samples: np.ndarray) -> ChannelNorm:
    """nnU-Net's CT statistics of foreground intensities: 0.5/99.5 percentiles, mean, std."""
    samples = np.asarray(samples, dtype=np.float64).ravel()
    if samples.size == 0:
        raise ConfigError("no foreground voxels to compute CT statistics from (data.body_threshold too high?)")
    low, high = np.percentile(samples, [0.5, 99.5])
    return ChannelNorm("ct", float(low), float(high), float(samples.mean()), float(max(samples.std(), 1e-8)))


def sample_foreground(values: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                      count: int = SAMPLES_PER_CASE) -> np.ndarray:
    """Up to ``count`` values of ``values (*S)`` where ``mask (*S)`` is true, drawn with ``rng``."""
    picked = np.asarray(values)[np.asarray(mask, dtype=bool)]
    if picked.size > count:
        picked = picked[rng.choice(picked.size, count, replace=False)]
    return picked


class Normalizer:
    """Per-channel normalisation of samples read from the cache, or of whole cases.

    Args:
        norms: one :class:`ChannelNorm` per channel.
    """

    def __init__(self, norms: Sequence[ChannelNorm]) -> None:
        self.norms = tuple(norms)
        self.ct_channels = [m for m, n in enumerate(self.norms) if n.scheme == "ct"]

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(n.scheme for n in self.norms)

    def to_json(self) -> list[dict[str, Any]]:
        return [n.to_json() for n in self.norms]

    @classmethod
    def from_json(cls, data: Any) -> "Normalizer":
        if not isinstance(data, list):
            raise ConfigError(f"normalisation must be a list of channel records, got {data!r}")
        return cls([ChannelNorm.from_json(d) for d in data])

    def raw_fill(self) -> np.ndarray:
        """``(M,)`` the value padding takes in a cached array: 0 (z-scored channels, whose
        background is 0) or the lower clip (CT channels, stored in HU: air)."""
        return np.asarray([n.low if n.scheme == "ct" else 0.0 for n in self.norms], dtype=np.float32)

    def finish(self, image: np.ndarray) -> np.ndarray:
        """A cached sample ``(M, *S)`` -> normalised: the CT channels clipped and
        z-scored with the dataset's statistics (other channels were normalised in the cache)."""
        if not self.ct_channels:
            return image
        out = np.array(image, dtype=np.float32, copy=True)
        for m in self.ct_channels:
            norm = self.norms[m]
            out[m] = (np.clip(out[m], norm.low, norm.high) - norm.mean) / norm.std
        return out

    def cache_stage(self, image: np.ndarray) -> np.ndarray:
        """What the cache stores of a case ``(M, *S)``: z-scored channels normalised, CT
        and ``none`` channels as they are."""
        return cache_stage(image, self.schemes)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """A whole case ``(M, *S)`` as read -> normalised (prediction's path)."""
        return self.finish(self.cache_stage(image))


def cache_stage(image: np.ndarray, schemes: Sequence[str]) -> np.ndarray:
    """``(M, *S)`` -> float32 with the ``zscore`` channels z-scored over their nonzero
    voxels (:func:`~medtune.data.preprocess.zscore_nonzero`), the others unchanged."""
    out = np.asarray(image, dtype=np.float32).copy()
    zscored = [m for m, s in enumerate(schemes) if s == "zscore"]
    if zscored:
        out[zscored] = zscore_nonzero(out[zscored])
    return out


__all__ = [
    "ChannelNorm", "DEFAULT_BODY_THRESHOLD", "NORMALIZATIONS", "Normalizer", "SCHEMES", "cache_stage",
    "channel_schemes", "ct_statistics", "foreground", "sample_foreground",
]
