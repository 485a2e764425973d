"""Save and load adapters, the same way for every method (in the spirit of peft).

An adapter folder holds ``adapter_config.json`` (the config dataclass as a mapping plus
the backbone's name) and ``adapter_model.safetensors`` (only the tensors the method
trained: its own parameters and buffers, e.g. BatchNorm statistics, and the trained
extras; for ``full`` the whole backbone, for ``decoder-only`` nothing). Tensor names
are those of the backbone's ``state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medtune.adapters.core import ADAPTERS, AdapterConfig, AdapterInfo, find_adapted
from medtune.checkpoints.io import load_json, load_trained_state, load_weights, save_json, save_safetensors
from medtune.config import from_dict, to_dict
from medtune.errors import CheckpointError, ConfigError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


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
    """Build the config of ``data["method"]`` (a ``"backbone"`` key is ignored); unknown keys are errors."""
    fields = {k: v for k, v in data.items() if k != "backbone"}
    method = fields.get("method", AdapterConfig.method)
    config_class = ADAPTERS.get(str(method)).config_class
    return from_dict(config_class, {**fields, "method": method}, where="adapter")


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
    folder = Path(folder)
    config = adapter_config_dict(model)
    save_safetensors(
        adapter_state_dict(model),
        folder / ADAPTER_WEIGHTS_FILE,
        metadata={"method": config["method"], "backbone": config["backbone"]},
    )
    save_json(config, folder / ADAPTER_CONFIG_FILE)
    return folder


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, str | None]:
    """``(config, backbone name)`` from ``folder/adapter_config.json``."""
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
