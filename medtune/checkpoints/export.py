"""Segmentation run folders and exports: write them, and load any of them back.

A finetuning run folder (``medtune finetune``) holds::

    config.json                 the FinetuneConfig + label_values + regions (task: segmentation)
    backbone.safetensors        the base backbone as loaded before the adapter (frozen weights)
    model.safetensors           the whole segmenter (backbone + adapter + decoder), last step
    adapter_config.json         the adapter's config, the run config, and the base weights' sha256
    adapter_model.safetensors   only the trained tensors: adapter + trained extras + decoder
    best/                       model.safetensors + adapter files of the best validation
    metrics.jsonl, state/       training log and resumable Accelerate states

``medtune export RUN --format F --out DIR`` writes one of:

- ``full``: ``config.json`` + ``model.safetensors`` (self-contained).
- ``adapter``: ``adapter_config.json`` + ``adapter_model.safetensors`` (trained tensors
  only). The base backbone is *referenced*, not copied: ``adapter_config.json`` records
  the backbone config, the base weights' absolute path and their sha256, checked on
  load (pass ``base_weights=`` / ``--base-weights`` if the file moved;
  ``copy_base=True`` / ``--copy-base`` puts a copy beside the adapter instead).
- ``merged``: LoRA folded into the base weights -> ``config.json`` + ``model.safetensors``
  of a plain model (adapter method ``full``, no LoRA layers). Methods that add modules
  (Med-Tuning, AdaptFormer, ...) cannot be folded: :class:`ConfigError`.

:func:`load_segmenter` reads a run folder or any export and returns the model, ready
for :meth:`SliceSegmenter.predict_volume`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from medtune.checkpoints.io import (
    load_json,
    load_state,
    load_trained_state,
    load_weights,
    save_json,
    save_safetensors,
)
from medtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
BEST_DIR = "best"
FORMATS = ("adapter", "full", "merged")
# keys of config.json that are not FinetuneConfig fields
RUN_INFO_KEYS = ("label_values", "regions", "format", "merged_from")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_config_dict(cfg, label_spec) -> dict[str, Any]:
    """``config.json`` content of a segmentation run: the config plus the label mapping."""
    from medtune.config import to_dict

    return {
        **to_dict(cfg),
        "label_values": list(label_spec.values),
        "regions": {k: list(v) for k, v in label_spec.regions.items()},
    }


def parse_run_config(data: Mapping[str, Any], source: str | Path):
    """``config.json`` mapping -> ``(FinetuneConfig, LabelSpec, info)``."""
    from medtune.config import from_dict
    from medtune.data.labels import LabelSpec
    from medtune.finetune.config import FinetuneConfig

    if not isinstance(data, Mapping):
        raise CheckpointError(f"{source}: must hold a JSON object")
    info = {k: data[k] for k in RUN_INFO_KEYS if k in data}
    fields = {k: v for k, v in data.items() if k not in RUN_INFO_KEYS}
    try:
        cfg = from_dict(FinetuneConfig, fields)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if cfg.task != "segmentation":
        raise CheckpointError(f"{source}: task '{cfg.task}' is not a segmentation run")
    if "label_values" not in info:
        raise CheckpointError(f"{source}: no 'label_values' (not a segmentation run folder?)")
    values = tuple(int(v) for v in info["label_values"])
    regions = {k: tuple(v) for k, v in info.get("regions", {}).items()} or None
    spec = LabelSpec(values, regions, None) if regions else LabelSpec.from_values(values)
    return cfg, spec, info


# --------------------------------------------------------------------------- writing


def save_trained_weights(model, folder: str | Path, run_config: Mapping[str, Any], base_file: str | Path) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` of ``model`` into ``folder``.

    ``base_file`` is the base backbone's weight file the trained tensors apply to; its
    path (absolute, or relative when it lies in ``folder``) and sha256 are recorded.
    """
    from medtune.adapters import adapter_config_dict
    from medtune.finetune.segmentation import trained_state_dict

    folder, base_file = Path(folder), Path(base_file)
    state = trained_state_dict(model)
    adapter = adapter_config_dict(model.backbone)
    save_safetensors(state, folder / ADAPTER_WEIGHTS_FILE, metadata={"method": adapter["method"], "task": "segmentation"})
    try:
        base_path = str(base_file.resolve().relative_to(folder.resolve()))
    except ValueError:
        base_path = str(base_file.resolve())
    save_json(
        {
            **adapter,
            "task": "segmentation",
            "base_weights": {"path": base_path, "sha256": file_sha256(base_file)},
            "run_config": dict(run_config),
        },
        folder / ADAPTER_CONFIG_FILE,
    )
    return folder


def save_full_weights(model, folder: str | Path, run_config: Mapping[str, Any]) -> Path:
    """``config.json`` + ``model.safetensors`` (every tensor of the segmenter)."""
    folder = Path(folder)
    save_safetensors(model.state_dict(), folder / MODEL_FILE, metadata={"task": "segmentation"})
    save_json(dict(run_config), folder / CONFIG_FILE)
    return folder


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    fmt: str,
    *,
    which: str = "best",
    copy_base: bool = False,
) -> Path:
    """Export a segmentation run (or another export) as ``adapter``, ``full`` or ``merged``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}' (known: {', '.join(FORMATS)})")
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(run_dir).resolve():
        raise ConfigError(f"--out {out_dir} is the run folder itself: its weight files would be overwritten")
    model = load_segmenter(run_dir, which=which)
    run_config = dict(model.run_config)
    method = model.run_config["adapter"]["method"]
    if fmt == "merged" and method != "lora":
        why = (
            "it has no adapter to fold; use --format full"
            if method in ("full", "decoder-only")
            else "its adapter adds modules of its own that cannot be folded into the base weights; "
            "use --format full or adapter"
        )
        raise ConfigError(f"cannot export '{method}' as merged: {why} (only LoRA merges)")
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the export can be written
    if fmt == "full":
        run_config["format"] = "full"
        return save_full_weights(model, out_dir, run_config)
    if fmt == "adapter":
        base = model.base_weights_file
        if base is None:
            raise CheckpointError(f"{run_dir}: no base backbone weights to reference (backbone.safetensors)")
        if copy_base:
            target = out_dir / BACKBONE_FILE
            if Path(base).resolve() != target.resolve():
                shutil.copyfile(base, target)
            base = target
        return save_trained_weights(model, out_dir, run_config, base)
    from medtune.adapters import merge_lora

    merge_lora(model.backbone)
    run_config.update(adapter={"method": "full"}, format="merged", merged_from="lora")
    return save_full_weights(model, out_dir, run_config)


# --------------------------------------------------------------------------- loading


def _weights_dir(path: Path, which: str) -> Path:
    if which not in ("best", "last"):
        raise ConfigError(f"checkpoint must be 'best' or 'last', got '{which}'")
    best = path / BEST_DIR
    if which == "best" and ((best / MODEL_FILE).is_file() or (best / ADAPTER_WEIGHTS_FILE).is_file()):
        return best
    return path


def load_segmenter(
    path: str | Path,
    *,
    which: str = "best",
    base_weights: str | Path | None = None,
    map_location: str | torch.device = "cpu",
):
    """Load a segmentation run folder or an export (full, adapter, merged).

    Args:
        path: the run folder or export folder.
        which: ``"best"`` (the best validation checkpoint if the run kept one) or ``"last"``.
        base_weights: the base backbone file for an adapter export (default: the path
            recorded in ``adapter_config.json``, its sha256 checked).

    Returns:
        a :class:`~medtune.finetune.segmentation.SliceSegmenter` in eval mode with
        ``run_config`` (the config.json mapping), ``label_spec``, ``roi_size`` and
        ``base_weights_file`` attributes set.

    Raises:
        CheckpointError: no weights in the folder, a tensor of another shape or name
            (an adapter of another backbone), a base file whose sha256 differs.
    """
    from medtune.finetune.segmentation import build_segmenter, trained_state_dict

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    weights_dir = _weights_dir(path, which)
    full_file = weights_dir / MODEL_FILE
    adapter_file = weights_dir / ADAPTER_WEIGHTS_FILE
    base_file: Path | None = path / BACKBONE_FILE if (path / BACKBONE_FILE).is_file() else None
    if full_file.is_file():
        run_config = load_json(path / CONFIG_FILE)
        cfg, spec, _ = parse_run_config(run_config, path / CONFIG_FILE)
        model, _ = build_segmenter(cfg, spec.num_classes, load_pretrained=False)
        load_state(model, load_weights(full_file), strict=True, source=full_file)
    elif adapter_file.is_file():
        adapter_json = load_json(path / ADAPTER_CONFIG_FILE)
        if not isinstance(adapter_json, dict) or "run_config" not in adapter_json:
            raise CheckpointError(f"{path / ADAPTER_CONFIG_FILE}: not a medtune segmentation adapter (no run_config)")
        run_config = adapter_json["run_config"]
        cfg, spec, _ = parse_run_config(run_config, path / ADAPTER_CONFIG_FILE)
        recorded = adapter_json.get("base_weights") or {}
        if base_weights is not None:
            base_file = Path(base_weights)
        elif base_file is None:
            if "path" not in recorded:
                raise CheckpointError(f"{path / ADAPTER_CONFIG_FILE}: records no base weights; pass base_weights")
            base_file = Path(recorded["path"])
            base_file = base_file if base_file.is_absolute() else path / base_file
            if not base_file.is_file():
                raise CheckpointError(
                    f"{path / ADAPTER_CONFIG_FILE}: base weights {base_file} not found (moved? pass --base-weights)"
                )
            if recorded.get("sha256") and file_sha256(base_file) != recorded["sha256"]:
                raise CheckpointError(
                    f"{base_file}: sha256 differs from the one recorded in {path / ADAPTER_CONFIG_FILE} "
                    "(other base weights than the adapter was trained on)"
                )
        base_state = load_weights(base_file)
        model, _ = build_segmenter(cfg, spec.num_classes, load_pretrained=False, base_state=base_state)
        # an explicit --base-weights of the right shapes must still be the base it was trained on
        if base_weights is not None and recorded.get("sha256") and file_sha256(base_file) != recorded["sha256"]:
            raise CheckpointError(
                f"{base_file}: sha256 differs from the base recorded in {path / ADAPTER_CONFIG_FILE} "
                f"({recorded.get('path')}): other base weights than the adapter was trained on"
            )
        state = load_weights(adapter_file)
        load_trained_state(model, state, trained_state_dict(model), source=adapter_file)
    else:
        raise CheckpointError(
            f"{path}: no weights ({MODEL_FILE} or {ADAPTER_WEIGHTS_FILE}); "
            "is this a finished medtune finetune run or export?"
        )
    model.to(map_location).eval()
    model.run_config = run_config
    model.label_spec = spec
    model.roi_size = cfg.roi_size
    model.base_weights_file = base_file
    return model
