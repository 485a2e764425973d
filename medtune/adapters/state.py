"""Save and load adapters, the same way for every method (in the spirit of peft).

An adapter folder holds ``adapter.json`` (the config dataclass as a mapping plus the
backbone's name, and where a run or export wrote it, the base weights' path and sha256)
and ``adapter.safetensors`` (only the tensors the method trained: its own parameters
and buffers, e.g. BatchNorm statistics, and the trained extras; for ``full`` the whole
backbone, for ``decoder-only`` nothing). Tensor names are those of the adapted
backbone's ``state_dict``. The file names are medtune's own (peft's
``adapter_config.json`` / ``adapter_model.safetensors`` are left to real peft folders).

The *base* of an adapter is the backbone as it was before :func:`apply_adapter`:
:func:`base_state_dict` reads it back from an adapted backbone (the method's own
tensors left out, LoRA's ``base_layer`` names mapped back) and :func:`load_base_state`
loads such a file into one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterInfo, find_adapted
from medtune.checkpoints.io import load_json, load_state, load_trained_state, load_weights, save_json, save_safetensors
from medtune.checkpoints.runs import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from medtune.config import from_dict, to_dict
from medtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# keys of adapter.json that are not the method's config
RECORD_KEYS = ("backbone", "base_weights")


def _adapted(model: nn.Module) -> tuple[nn.Module, AdapterInfo]:
    found = find_adapted(model)
    if found is None:
        raise ConfigError("model has no adapter; call medtune.adapters.apply_adapter first")
    return found[1], found[2]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of the adapted backbone in ``model``, by backbone state-dict name."""
    backbone, info = _adapted(model)
    return {
        name: tensor.detach()
        for name, tensor in backbone.state_dict().items()
        if info.group(name) is not None
    }


def load_adapter_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path = "<adapter state>"
) -> None:
    """Load tensors saved by :func:`adapter_state_dict` into the adapted backbone in ``model``.

    Every expected tensor must be present with the same shape, and no other tensor may
    be given; otherwise :class:`CheckpointError` names the tensor (an adapter of another
    backbone or method).
    """
    backbone, _ = _adapted(model)
    load_trained_state(backbone, state, adapter_state_dict(backbone), source=source)


def adapter_config_dict(model: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` content: the config as a mapping plus ``"backbone"``."""
    _, info = _adapted(model)
    return {**to_dict(info.config), "backbone": info.backbone_name}


def adapter_config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Build the config of ``data["method"]`` (``adapter.json``'s records are ignored); unknown keys are errors."""
    fields = {k: v for k, v in data.items() if k not in RECORD_KEYS}
    method = fields.get("method", AdapterConfig.method)
    config_class = ADAPTERS.get(str(method)).config_class
    return from_dict(config_class, {**fields, "method": method}, where="adapter")


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted backbone in ``model`` as it was before :func:`apply_adapter`.

    Every tensor but the method's own, under its original name (LoRA's
    ``qkv.base_layer.weight`` is ``qkv.weight`` again); trained extras at their current
    value. Right after ``apply_adapter`` this equals the backbone's state before it.
    """
    backbone, info = _adapted(model)
    method = ADAPTERS.get(info.config.method)
    return {
        method.base_name(name): tensor.detach()
        for name, tensor in backbone.state_dict().items()
        if info.trains_everything or info.group(name) != "adapter"
    }


def load_base_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path = "<base weights>"
) -> None:
    """Load base weights (names of the backbone before :func:`apply_adapter`) into the
    adapted backbone in ``model``; every base tensor must be given with its shape."""
    backbone, info = _adapted(model)
    method = ADAPTERS.get(info.config.method)
    adapted = {
        method.base_name(name): name
        for name in backbone.state_dict()
        if info.trains_everything or info.group(name) != "adapter"
    }
    unknown = [name for name in state if name not in adapted]
    missing = [name for name in adapted if name not in state]
    if unknown or missing:
        what = f"unexpected tensor '{unknown[0]}'" if unknown else f"missing tensor '{missing[0]}'"
        raise CheckpointError(
            f"{source}: not the base weights of this {info.backbone_name} backbone ({what}; "
            f"{len(unknown)} unexpected, {len(missing)} missing)"
        )
    load_state(backbone, {adapted[name]: tensor for name, tensor in state.items()}, strict=False, source=source,
               quiet=True)
    log.info("%s: loaded %d base tensors", source, len(state))


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    records: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter.json`` (plus ``records``, e.g. the base weights) and
    ``adapter.safetensors`` into ``folder``. ``tensors``: the trained tensors when they
    come from elsewhere than the module (gathered from a sharded model); default
    :func:`adapter_state_dict`."""
    folder = Path(folder)
    config = {**adapter_config_dict(model), **dict(records or {})}
    save_safetensors(
        adapter_state_dict(model) if tensors is None else tensors,
        folder / ADAPTER_WEIGHTS_FILE,
        metadata={"method": config["method"], "backbone": config["backbone"]},
    )
    save_json(config, folder / ADAPTER_CONFIG_FILE)
    return folder


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, str | None]:
    """``(config, backbone name)`` from ``folder/adapter.json``."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    data = load_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    try:
        return adapter_config_from_dict(data), data.get("backbone")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load ``folder``'s adapter weights into ``model``, whose adapter must match its config."""
    folder = Path(folder)
    saved_cfg, saved_backbone = read_adapter_config(folder)
    _, info = _adapted(model)
    if saved_cfg.method != info.config.method:
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG_FILE}: adapter '{saved_cfg.method}', the model has "
            f"'{info.config.method}'"
        )
    if saved_backbone is not None and saved_backbone != info.backbone_name:
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG_FILE}: adapter for backbone '{saved_backbone}', the model "
            f"has '{info.backbone_name}'"
        )
    weights = folder / ADAPTER_WEIGHTS_FILE
    load_adapter_state(model, load_weights(weights), source=weights)
