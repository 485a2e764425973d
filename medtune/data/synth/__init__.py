"""Generated datasets, one module per kind.

- :mod:`.brats` (:func:`synthesize_brats`): BraTS-2020-style cases, four contrasts and a
  label map per case as NIfTI, for segmentation and pretraining.
- :mod:`.shapes` (:func:`synthesize_referring`): PNG images of 2-3 coloured shapes, a
  mask per shape and ``referring.jsonl`` with one referring expression per shape.
- :mod:`.vqa` (:func:`synthesize_vqa`): VQA-RAD-style grey brain slices with
  ``trainset.json`` / ``testset.json``, read as format ``vqa_rad``.

Names are imported on first use, like :mod:`medtune.data`'s, so that using one
generator imports only what it needs (nibabel and scipy for brats, PIL for the others),
never torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module of this package that defines it
_EXPORTS: dict[str, str] = {
    "SYNTH_MODALITIES": "brats",
    "synthesize_brats": "brats",
    "synthesize_case": "brats",
    "synthesize_referring": "shapes",
    "GENERATED_QUESTIONS": "vqa",
    "GeneratedQuestion": "vqa",
    "draw_brain_slices": "vqa",
    "synthesize_vqa": "vqa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'medtune.data.synth' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
