"""Trained task models on disk: the weight files of a run, and reading any of them back.

For every task, a finetuning run (and its ``best/``) holds ``model.safetensors``, the
whole model. A model whose ``backbone`` carries an adapter (``medtune.adapters``) also
gets the adapter files, in the layout of :mod:`medtune.checkpoints.runs`:

- ``backbone.safetensors`` (the run folder, written once when the run starts): the base
  backbone the adapter applies to, under its names before the adapter;
- ``adapter.json`` + ``adapter.safetensors``: the adapter config (plus the base file's
  path and sha256) and the trained backbone tensors;
- ``head.safetensors``: every model tensor outside the backbone (decoder, text tower,
  answer head, ...).

:func:`load_trained` rebuilds the task's model from ``config.json`` and reads either
form; ``medtune predict``, ``evaluate`` and ``export`` all load through it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medtune.checkpoints.io import load_json, load_state, load_trained_state, load_weights, save_safetensors
from medtune.checkpoints.runs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BACKBONE_FILE,
    DEFAULT_CHECKPOINT,
    HEAD_FILE,
    MODEL_FILE,
    read_run_config,
    weights_dir,
)
from medtune.errors import CheckpointError
from medtune.finetune.base import Loaded, Task, get_task

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapted_backbone(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name in model, module)`` of the adapted backbone inside ``model``, or None."""
    from medtune.adapters import find_adapted

    found = find_adapted(model)
    return (found[0], found[1]) if found is not None else None


def head_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` outside its adapted backbone, by ``model.state_dict()`` name
    (values from ``state`` when given: the full weights of a sharded model)."""
    found = adapted_backbone(model)
    if found is None:
        raise CheckpointError("the model has no adapted backbone: there is no head to separate")
    prefix = f"{found[0]}." if found[0] else ""
    state = model.state_dict() if state is None else state
    return {k: v.detach() for k, v in state.items() if not (prefix and k.startswith(prefix))}


def adapter_tensors(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's trained tensors (backbone names) taken from the model's full ``state``."""
    from medtune.adapters import adapter_state_dict

    name, backbone = adapted_backbone(model)
    prefix = f"{name}." if name else ""
    return {key: state[prefix + key] for key in adapter_state_dict(backbone)}


# --------------------------------------------------------------------------- writing


def save_base_backbone(model: nn.Module, run_dir: Path, metadata: Mapping[str, str] | None = None) -> Path | None:
    """``backbone.safetensors``: the base backbone of an adapted model (None for other models).

    Called when a run starts, before training changes the trained extras.
    """
    from medtune.adapters import base_state_dict

    if adapted_backbone(model) is None:
        return None
    return save_safetensors(base_state_dict(model), run_dir / BACKBONE_FILE, metadata=dict(metadata or {}))


def base_record(base_file: Path, folder: Path) -> dict[str, Any]:
    """``adapter.json``'s ``base_weights``: the path (relative when it lies in ``folder``) and sha256."""
    try:
        path = str(base_file.resolve().relative_to(folder.resolve()))
    except ValueError:
        path = str(base_file.resolve())
    return {"path": path, "sha256": file_sha256(base_file)}


def save_adapter_files(model: nn.Module, folder: Path, base_file: Path, task: str,
                       state: Mapping[str, torch.Tensor] | None = None) -> None:
    """``adapter.json`` + ``adapter.safetensors`` + ``head.safetensors`` of ``model``
    (values from ``state`` when given: the full weights of a sharded model)."""
    from medtune.adapters import save_adapter

    state = model.state_dict() if state is None else state
    save_adapter(model, folder, records={"base_weights": base_record(base_file, folder)},
                 tensors=adapter_tensors(model, state))
    save_safetensors(head_state_dict(model, state), folder / HEAD_FILE, metadata={"task": task})


def save_trained(model: nn.Module, folder: Path, run_dir: Path, task: str,
                 state: Mapping[str, torch.Tensor] | None = None) -> None:
    """The weight files of a trained model into ``folder`` (the run folder or its ``best/``).

    ``state``: the model's full weights when the module holds shards
    (:attr:`medtune.trainer.TrainResult.state_dict`); default ``model.state_dict()``.
    """
    state = model.state_dict() if state is None else state
    save_safetensors(state, folder / MODEL_FILE, metadata={"task": task})
    if adapted_backbone(model) is not None and (run_dir / BACKBONE_FILE).is_file():
        save_adapter_files(model, folder, run_dir / BACKBONE_FILE, task, state)


# --------------------------------------------------------------------------- reading


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU (the default of every command)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _base_file(folder: Path, record: Mapping[str, Any], base_weights: str | Path | None) -> Path:
    """The base backbone of an adapter folder, its sha256 checked against ``record``."""
    config_file = folder / ADAPTER_CONFIG_FILE
    if base_weights is not None:
        base = Path(base_weights)
    elif (folder / BACKBONE_FILE).is_file():
        base = folder / BACKBONE_FILE
    else:
        if "path" not in record:
            raise CheckpointError(f"{config_file}: records no base weights; pass --base-weights")
        base = Path(record["path"])
        base = base if base.is_absolute() else folder / base
        if not base.is_file():
            raise CheckpointError(f"{config_file}: base weights {base} not found (moved? pass --base-weights)")
    if not base.is_file():
        raise CheckpointError(f"base weights not found: {base}")
    return base


def _check_base_sha(base: Path, record: Mapping[str, Any], config_file: Path) -> None:
    if record.get("sha256") and file_sha256(base) != record["sha256"]:
        raise CheckpointError(
            f"{base}: sha256 differs from the base recorded in {config_file} "
            f"({record.get('path')}): other base weights than the adapter was trained on"
        )


def _in_backbone_names(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A base file in the network's own names (a Hub export's ``base/``, timm's or MONAI's
    keys) in the backbone's names (``model.<key>``); medtune's own files pass unchanged."""
    if not prefix or any(name.startswith(prefix) for name in state):
        return dict(state)
    return {prefix + name: tensor for name, tensor in state.items()}


def _load_adapter_form(model: nn.Module, folder: Path, weights: Path, base_weights: str | Path | None) -> Path:
    from medtune.adapters import find_adapted, load_adapter, load_base_state

    found = find_adapted(model)
    if found is None:
        raise CheckpointError(f"{weights}: adapter weights, but the run's model has no adapter")
    recorded = load_json(weights.parent / ADAPTER_CONFIG_FILE)
    record = (recorded.get("base_weights") if isinstance(recorded, dict) else None) or {}
    base = _base_file(folder, record, base_weights)
    config_file = weights.parent / ADAPTER_CONFIG_FILE
    if base_weights is None:
        _check_base_sha(base, record, config_file)
    load_base_state(model, _in_backbone_names(load_weights(base), found[2].prefix), source=base)  # names the tensor
    if base_weights is not None:  # the right shapes must still be the base the adapter was trained on
        _check_base_sha(base, record, config_file)
    load_adapter(found[1], weights.parent)  # checks the method and backbone, then exactly the trained tensors
    head_file = weights.parent / HEAD_FILE
    if not head_file.is_file():
        raise CheckpointError(f"{weights.parent}: {ADAPTER_WEIGHTS_FILE} without {HEAD_FILE}")
    load_trained_state(model, load_weights(head_file), head_state_dict(model), source=head_file, what="head tensor")
    return base


def load_trained(
    folder: str | Path,
    which: str = DEFAULT_CHECKPOINT,
    *,
    base_weights: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    task: Task | None = None,
) -> Loaded:
    """Rebuild a run's (or an export's) model from ``config.json`` and load its weights.

    Args:
        folder: a run folder or an export of one.
        which: ``"best"`` (the best evaluation if the run kept one, else the last step)
            or ``"last"``.
        base_weights: the base backbone of an adapter folder, if not the one recorded in
            ``adapter.json`` (its sha256 must still match).
        device: where the model goes (None: CUDA if available, else CPU).
        task: the task, if the caller resolved it already (else ``config.json``'s).

    Raises:
        CheckpointError: no weights, a tensor of another name or shape, other base weights.
    """
    folder = Path(folder)
    run_config = read_run_config(folder)
    task = task or _task_of(run_config.task, folder)
    cfg = task.load_config(run_config.config)
    model = task.build_model(cfg, run_config.derived, pretrained=False)
    where = weights_dir(folder, which)
    base = None
    if (where / MODEL_FILE).is_file():
        weights = where / MODEL_FILE
        load_state(model, load_weights(weights), strict=True, source=weights)
    elif (where / ADAPTER_WEIGHTS_FILE).is_file():
        weights = where / ADAPTER_WEIGHTS_FILE
        base = _load_adapter_form(model, folder, weights, base_weights)
    else:
        raise CheckpointError(
            f"{folder}: no weights ({MODEL_FILE} or {ADAPTER_WEIGHTS_FILE}); is this a finished medtune run or export?"
        )
    model.to(resolve_device(device)).eval()
    return Loaded(task, model, cfg, run_config.derived, folder, weights, base)


def _task_of(name: str, folder: Path) -> Task:
    from medtune.checkpoints.runs import PRETRAIN_TASK

    if name == PRETRAIN_TASK:
        raise CheckpointError(
            f"{folder} is a pretraining run: finetune from it (medtune finetune --backbone {folder}), "
            "then use the finetuned run"
        )
    return get_task(name)


__all__ = [
    "adapted_backbone", "base_record", "file_sha256", "head_state_dict", "load_trained", "resolve_device",
    "save_adapter_files", "save_base_backbone", "save_trained",
]
