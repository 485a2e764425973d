"""Generated datasets, one module per kind, each reachable by name.

- ``brats`` (:func:`brats.synthesize_brats`): BraTS-2020-style cases, four contrasts and
  a label map per case as NIfTI, for segmentation and pretraining; ``anatomy=1`` adds a
  folded cortex, ventricles, tissue textures, a bias field and partial-volume edges
  (:mod:`~medtune.data.synth.anatomy`), structure a pretraining can learn.
- ``shapes`` (:func:`shapes.synthesize_referring`): PNG images of 2-3 coloured shapes, a
  mask per shape and ``referring.jsonl`` with one referring expression per shape.
- ``referring``: the same generator and files as ``shapes``. ``shapes`` names the image
  set, ``referring`` the task it serves (referring segmentation).
- ``vqa`` (:func:`vqa.synthesize_vqa`): VQA-RAD-style grey brain slices with
  ``trainset.json`` / ``testset.json``, read as format ``vqa_rad``.
- ``ct`` (:func:`ct.synthesize_ct`): a single-modality CT task in the MSD layout (3D
  images in HU with an air background, anisotropic voxels, several orientations,
  ``dataset.json`` with training and test lists), for segmentation and pretraining.

Each generator is a plain function ``generate(out_dir, <settings>, seed=...)`` that a
notebook can call directly. :func:`write_synthetic` is how ``medtune data synth --kind``
calls any of them, with one set of guarantees for every kind: existing files are never
touched, and a file that exists with other content is refused by name::

    write_synthetic("shapes", "data/shapes", seed=0, images=150, image_size=32)

:data:`SYNTH_KINDS` maps a kind's name to a :class:`SynthKind`: where its generator
lives and its settings (:class:`SynthOption`, which are also the CLI flags). Generators
are imported on first use, like :mod:`medtune.data`'s names, so picking a kind imports
only what that kind needs (nibabel and scipy for brats, PIL for the others), never torch.
"""

from __future__ import annotations

import filecmp
import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from medtune.errors import ConfigError, DataError
from medtune.registry import Registry

# public name -> module of this package that defines it
_EXPORTS: dict[str, str] = {
    "SYNTH_MODALITIES": "brats",
    "synthesize_brats": "brats",
    "synthesize_case": "brats",
    "synthesize_ct": "ct",
    "synthesize_referring": "shapes",
    "GENERATED_QUESTIONS": "vqa",
    "GeneratedQuestion": "vqa",
    "draw_brain_slices": "vqa",
    "synthesize_vqa": "vqa",
}

__all__ = sorted([*_EXPORTS, "SYNTH_KINDS", "SynthKind", "SynthOption", "write_synthetic"])


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'medtune.data.synth' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


@dataclass(frozen=True)
class SynthOption:
    """One integer setting of a kind, also a flag of ``medtune data synth``.

    Attributes:
        name: the setting's name; its flag is ``--`` + name with ``-`` for ``_``
            (``image_size`` -> ``--image-size``).
        keyword: the generator's parameter it fills (``images`` -> ``num_images``).
        default: one int, or a tuple of ints for a setting of several numbers.
        minimum: smallest allowed value (of every number).
        help: what it sets, the same words for every kind that has it.
        metavar: the value's name in ``--help``, one per number.
        maximum: largest allowed value (of every number), or None.
    """

    name: str
    keyword: str
    default: int | tuple[int, ...]
    minimum: int
    help: str
    metavar: str | tuple[str, ...] = "N"
    maximum: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def nargs(self) -> int | None:
        """How many numbers the flag takes; ``None`` for a single int."""
        return len(self.default) if isinstance(self.default, tuple) else None

    def check(self, value: Any, kind: str) -> int | tuple[int, ...]:
        """``value`` as the generator takes it; :class:`ConfigError` if malformed or too small."""
        numbers = list(value) if self.nargs is not None and isinstance(value, (list, tuple)) else [value]
        integers = all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
        if len(numbers) != (self.nargs or 1) or not integers:
            raise ConfigError(f"synth {kind}: {self.flag} takes {self.nargs or 1} integer(s), got {value!r}")
        if min(numbers) < self.minimum:
            raise ConfigError(f"synth {kind}: {self.flag} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and max(numbers) > self.maximum:
            raise ConfigError(f"synth {kind}: {self.flag} must be <= {self.maximum}, got {value!r}")
        return tuple(numbers) if self.nargs is not None else numbers[0]


@dataclass(frozen=True)
class SynthKind:
    """A kind of generated dataset: its generator and its settings.

    Attributes:
        name: the kind's name in :data:`SYNTH_KINDS` and error messages.
        module: module of this package holding the generator (imported on first use).
        function: the generator, ``function(out_dir, <keywords>, seed=...)``.
        help: what the kind writes, one line.
        options: its settings; the generator's other parameters keep their defaults.
    """

    name: str
    module: str
    function: str
    help: str
    options: tuple[SynthOption, ...]

    def generator(self) -> Callable[..., object]:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.function)

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` by setting name, defaults filled in and checked; in :attr:`options` order.

        Raises:
            ConfigError: a setting this kind does not have, or a bad value.
        """
        known = {option.name: option for option in self.options}
        for name in options:
            if name not in known:
                flags = ", ".join(option.flag for option in self.options)
                raise ConfigError(f"synth {self.name}: --{name.replace('_', '-')} is not one of its options ({flags})")
        return {
            option.name: option.check(options.get(option.name, option.default), self.name) for option in self.options
        }


SYNTH_KINDS: Registry[SynthKind] = Registry("synthetic dataset kind")

_SHAPES_OPTIONS = (
    SynthOption("images", "num_images", 150, 1, "number of images"),
    SynthOption("image_size", "image_size", 32, 24, "side of the square images in pixels", "PX"),
)
for _kind in (
    SynthKind(
        "brats",
        "brats",
        "synthesize_brats",
        "BraTS-2020-style NIfTI cases (flair, t1, t1ce, t2, seg), one folder per case",
        (
            SynthOption("cases", "cases", 4, 1, "number of cases"),
            SynthOption("shape", "shape", (64, 64, 48), 8, "volume shape", ("H", "W", "D")),
            SynthOption("anatomy", "anatomy", 0, 0, "1: folded cortex, ventricles, a texture per tissue, "
                        "bias field and partial-volume edges; 2: that, with tumour contrasts that overlap "
                        "healthy tissue and vary by case (0: plain grey/white mix)", "0|1|2", maximum=2),
        ),
    ),
    SynthKind(
        "ct",
        "ct",
        "synthesize_ct",
        "an MSD-layout CT task: 3D HU images (air -1000) of a body with an organ and a lesion, "
        "anisotropic voxels, LPS/RAS/PSR orientations, imagesTr/ labelsTr/ imagesTs/ dataset.json",
        (
            SynthOption("cases", "cases", 4, 1, "number of cases"),
            SynthOption("shape", "shape", (48, 48, 12), 8, "volume shape", ("H", "W", "D")),
            SynthOption("test_cases", "test_cases", 1, 0, "number of unlabeled test cases (imagesTs/)"),
        ),
    ),
    SynthKind(
        "shapes",
        "shapes",
        "synthesize_referring",
        "2-3 coloured shapes per image: images/*.png, one mask per shape in masks/, one referring "
        "expression per shape in referring.jsonl",
        _SHAPES_OPTIONS,
    ),
    SynthKind(
        "referring",
        "shapes",
        "synthesize_referring",
        "the same files as shapes: 'shapes' names the image set, 'referring' the task it serves "
        "(referring segmentation)",
        _SHAPES_OPTIONS,
    ),
    SynthKind(
        "vqa",
        "vqa",
        "synthesize_vqa",
        "VQA-RAD-style grey brain slices with 0-2 lesions: images/*.png, trainset.json, testset.json",
        (
            SynthOption("images", "images", 240, 1, "number of images"),
            # below 16 px a small lesion can cover no pixel, and its answers would be wrong
            SynthOption("image_size", "img_size", 64, 16, "side of the square images in pixels", "PX"),
        ),
    ),
):
    SYNTH_KINDS.register(_kind.name)(_kind)


def write_synthetic(kind: str, out: str | Path, seed: int = 0, **options: Any) -> list[Path]:
    """Write the generated ``kind`` set under ``out`` without touching what is there.

    Generates into a temporary folder beside ``out``, then moves in only the files that
    are missing: a file already there with the same bytes is kept as it is (its mtime
    too, so caches keyed on it stay valid), and one with other content (another
    dataset, other settings or seed) is refused by name before anything is written.
    Re-running the same command writes nothing.

    Args:
        kind: a name in :data:`SYNTH_KINDS` (``brats``, ``shapes``, ``referring``, ``vqa``).
        out: output folder, created if missing.
        seed: random seed; the same seed and settings give the same bytes.
        options: the kind's settings by name (``cases=8``, ``image_size=32``); missing
            ones take the kind's defaults.
    Returns:
        the files written, sorted.
    Raises:
        ConfigError: unknown kind, or a setting the kind does not have or a bad value.
        DataError: ``out`` is a file, or holds a generated file with other content.
    """
    spec = SYNTH_KINDS.get(kind)
    settings = spec.settings(options)
    keywords = {option.keyword: settings[option.name] for option in spec.options}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"synth: --out {out} is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.synth-", dir=out.parent) as tmp:
        spec.generator()(tmp, seed=seed, **keywords)
        generated = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        for name in generated:
            target = out / name
            if target.exists() and (not target.is_file() or not filecmp.cmp(target, Path(tmp) / name, shallow=False)):
                raise DataError(
                    f"synth: {target} already exists with other content; choose another --out (nothing was written)"
                )
        written = []
        for name in generated:
            target = out / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / name, target)
                written.append(target)
    return written
