"""Weights in the names other tools load: timm and MONAI backbones, peft LoRA folders.

medtune's files use medtune's names: a :class:`~medtune.models.Backbone` holds its timm
or MONAI network as ``.model``, so ``backbone.safetensors`` keys are ``model.<timm key>``,
and a LoRA backbone's tensors carry peft's adapter name (``qkv.lora_A.default.weight``).
Here they become what each tool expects, as small pure functions plus writers:

- **timm** (:func:`timm_state_dict`, :func:`timm_config`): ``model.safetensors`` with
  timm's own keys (the model built with ``num_classes=0``) and ``config.json`` in the
  layout of timm's Hub configs (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``), so both of these load it with zero missing and zero unexpected
  keys::

      timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"),
                        in_chans=M, img_size=S, num_classes=0, **options)
      timm.create_model("local-dir:EXPORT", pretrained=True)     # model_args hold M, S, options

- **MONAI** (:func:`monai_state_dict`): the encoder of MONAI's ``SwinUNETR`` key for key
  (``SwinUNETR(...).swinViT.load_state_dict(state, strict=True)``); ``config.json``
  names the network, the attribute it loads into and the constructor arguments.
- **peft** (:func:`peft_lora_state_dict`, :func:`write_peft_folder`): a LoRA backbone as
  a peft folder (``adapter_config.json`` written by peft's own ``LoraConfig`` +
  ``adapter_model.safetensors`` in peft's names relative to the timm model,
  ``base_model.model.blocks.0.attn.qkv.lora_A.weight``), which
  ``PeftModel.from_pretrained(timm_model, folder)`` loads.

:func:`plain_backbone` is the one place that decides whether a model's backbone *is* a
plain timm/MONAI network (no adapter, full finetuning, decoder-only, or LoRA once
merged); :func:`pretraining_backbone` reads a pretraining run's encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medtune.checkpoints.io import load_state, load_weights, save_json, save_safetensors
from medtune.checkpoints.runs import (
    BACKBONE_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    PRETRAIN_TASK,
    RunConfig,
)
from medtune.config import from_dict, to_dict
from medtune.errors import CheckpointError, ConfigError
from medtune.models.backbones import Backbone, BackboneConfig, create_backbone

# the tool that loads each backbone family's plain network
FAMILY_FORMAT = {"vit": "timm", "swin": "timm", "convnext": "timm", "timm": "timm", "monai_swin": "monai"}
# adapter methods whose backbone is (or, LoRA, merges into) the plain network
PLAIN_METHODS = ("full", "decoder-only", "lora")
# the MONAI network and the attribute a swinunetr backbone's tensors load into, key for key.
# A whole-network FreMAE file (encoder + UNETR decoder) would map the encoder to
# "swinViT.<key>" and its decoder tensors to SwinUNETR's own names (encoder1..., decoder5...,
# out): extend monai_state_dict with that table when such runs exist.
MONAI_NETWORK = "monai.networks.nets.SwinUNETR"
MONAI_ENCODER_ATTRIBUTE = "swinViT"


@dataclass
class PlainBackbone:
    """A backbone that is exactly a timm or MONAI network (see :func:`plain_backbone`).

    Attributes:
        backbone: the medtune :class:`Backbone` (eval mode; its ``model`` is the plain network).
        section: its ``backbone:`` config section (``pretrained`` left out).
        what: what these weights are, for logs and the model card.
    """

    backbone: Backbone
    section: dict[str, Any]
    what: str

    @property
    def format(self) -> str:
        """``"timm"`` or ``"monai"``: the tool that loads this network."""
        return FAMILY_FORMAT.get(self.backbone.family, "timm")


def find_backbone(model: nn.Module) -> Backbone | None:
    """The first medtune :class:`Backbone` inside ``model`` (itself included), or None."""
    return next((m for m in model.modules() if isinstance(m, Backbone)), None)


def backbone_section(backbone: Backbone) -> dict[str, Any]:
    """The ``backbone:`` config section ``backbone`` was built from, without ``pretrained``."""
    if backbone.config is None:
        raise CheckpointError("the backbone was built by hand (no BackboneConfig): its architecture is unknown")
    return {k: v for k, v in to_dict(backbone.config).items() if k != "pretrained"}


def why_not_plain(model: nn.Module) -> str | None:
    """Why ``model``'s backbone cannot be written as a plain timm/MONAI network, or None."""
    from medtune.adapters import find_adapted

    if find_backbone(model) is None:
        return f"the {type(model).__name__} model has no medtune backbone (its image tower is not a timm/MONAI network)"
    found = find_adapted(model)
    if found is not None and found[2].config.method not in PLAIN_METHODS:
        method = found[2].config.method
        return (f"'{method}' adds modules of its own that a plain timm/MONAI network does not have "
                "(export 'adapter' to keep them, or 'full' for medtune)")
    return None


def plain_backbone(model: nn.Module, what: str) -> PlainBackbone:
    """``model``'s backbone as a plain network: LoRA merged into it (in place), other methods refused."""
    from medtune.adapters import find_adapted, merge_lora

    why = why_not_plain(model)
    if why is not None:
        raise ConfigError(why)
    found = find_adapted(model)
    if found is not None and found[2].config.method == "lora":
        merge_lora(model)
        what = f"{what}, LoRA merged"
    backbone = find_backbone(model)
    return PlainBackbone(backbone.eval(), backbone_section(backbone), what)


def pretraining_backbone(folder: Path, run_config: RunConfig) -> PlainBackbone:
    """The encoder of a pretraining run: its backbone section + ``backbone.safetensors``."""
    if run_config.task != PRETRAIN_TASK:
        raise CheckpointError(f"{folder}: a '{run_config.task}' run, not a pretraining run")
    section = run_config.config.get("backbone")
    if not isinstance(section, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE}: no 'backbone' section")
    weights = folder / BACKBONE_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {BACKBONE_FILE} (has the pretraining run finished?)")
    backbone = create_backbone(from_dict(BackboneConfig, {**section, "pretrained": None}, "backbone"))
    load_state(backbone, load_weights(weights), strict=True, source=weights)
    objective = (run_config.config.get("objective") or {}).get("name", "pretraining")
    return PlainBackbone(backbone.eval(), backbone_section(backbone), f"{objective} pretrained encoder")


# --------------------------------------------------------------------------- timm


def timm_architecture(section: Mapping[str, Any]) -> str:
    """timm's model name of a backbone section (``timm:resnet18`` -> ``resnet18``)."""
    name = str(section["name"])
    return name.split(":", 1)[1] if name.startswith("timm:") else name


def timm_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """``backbone.state_dict()`` in timm's names (``model.blocks.0...`` -> ``blocks.0...``)."""
    state = backbone.state_dict()
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if len(inner) != len(state):
        stray = next(k for k in state if not k.startswith("model."))
        raise CheckpointError(f"backbone tensor '{stray}' is outside its network: not a plain backbone")
    return inner


def timm_model_args(backbone: Backbone, section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that rebuild the network (besides its name)."""
    options = {k: v for k, v in dict(section.get("options") or {}).items() if k != "out_indices"}
    args: dict[str, Any] = {"in_chans": int(section["in_chans"]), "num_classes": 0}
    if "img_size" in _init_args(backbone.model):
        args["img_size"] = int(section["img_size"])
    return {**args, **options}


def timm_config(plain: PlainBackbone, record: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` of a timm export, in the layout of timm's Hub configs.

    ``model_args`` rebuild the network (``timm.create_model("local-dir:DIR", pretrained=True)``
    or ``"hf-hub:org/name"``); ``pretrained_cfg`` describes the input (M z-scored
    modalities: mean 0, std 1); ``medtune`` records the backbone section and the source,
    so that ``--backbone`` reads the architecture back.
    """
    backbone, section = plain.backbone, plain.section
    model_args = timm_model_args(backbone, section)
    side = int(section["img_size"])
    channels = int(section["in_chans"])
    own = dict(getattr(backbone.model, "pretrained_cfg", None) or {})
    pretrained_cfg = {
        "input_size": [channels, side, side],
        "fixed_input_size": "img_size" in model_args,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": [0.0] * channels,  # medtune z-scores each modality over the brain
        "std": [1.0] * channels,
        "num_classes": 0,
        **{k: own[k] for k in ("first_conv", "classifier") if own.get(k)},
    }
    config = {
        "architecture": timm_architecture(section),
        "num_classes": 0,
        "num_features": int(getattr(backbone.model, "num_features", backbone.feature_channels[-1])),
        "in_chans": channels,
        "img_size": side,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "medtune": {"backbone": dict(section), **dict(record)},
    }
    global_pool = getattr(backbone.model, "global_pool", None)
    if isinstance(global_pool, str) and global_pool:
        config["global_pool"] = global_pool
    return config


def _init_args(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).__init__).parameters)


# --------------------------------------------------------------------------- MONAI


def monai_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """A ``swinunetr`` backbone's tensors as ``SwinUNETR.swinViT`` keys (medtune's
    ``model.<key>`` is MONAI's ``<key>``)."""
    if backbone.family != "monai_swin":
        raise ConfigError(f"backbone '{backbone.config.name if backbone.config else backbone}' is not MONAI's")
    return timm_state_dict(backbone)  # the same rule: the network's own names


def monai_config(plain: PlainBackbone, record: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` of a MONAI export: the network, the attribute the file loads into,
    and the ``SwinUNETR`` arguments of the encoder (``out_channels`` is the user's)."""
    from medtune.models.backbones import SwinUNETROptions

    section = plain.section
    options = from_dict(SwinUNETROptions, dict(section.get("options") or {}), "backbone.options")
    kwargs = {
        "in_channels": int(section["in_chans"]), "feature_size": options.feature_size,
        "depths": list(options.depths), "num_heads": list(options.num_heads), "window_size": options.window_size,
        "patch_size": options.patch_size, "mlp_ratio": options.mlp_ratio, "qkv_bias": options.qkv_bias,
        "normalize": options.normalize, "spatial_dims": int(section.get("spatial_dims", 2)),
        "downsample": options.downsample, "use_v2": options.use_v2,
    }
    return {
        "network": MONAI_NETWORK,
        "load_into": MONAI_ENCODER_ATTRIBUTE,
        "kwargs": kwargs,
        "medtune": {"backbone": dict(section), **dict(record)},
    }


def write_backbone(plain: PlainBackbone, folder: Path, record: Mapping[str, Any]) -> None:
    """``model.safetensors`` + ``config.json`` of ``plain`` in its tool's names (timm or MONAI)."""
    if plain.format == "monai":
        state, config = monai_state_dict(plain.backbone), monai_config(plain, record)
    else:
        state, config = timm_state_dict(plain.backbone), timm_config(plain, record)
    save_safetensors(state, folder / MODEL_FILE, metadata={"format": "pt", "source": "medtune"})
    save_json(config, folder / CONFIG_FILE)


# --------------------------------------------------------------------------- peft


_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (base_model) -> the timm model (model)


def lora_backbone(model: nn.Module):
    """``(adapted backbone, its AdapterInfo)`` of a LoRA model, or a :class:`ConfigError`."""
    from medtune.adapters import find_adapted

    found = find_adapted(model)
    if found is None or found[2].config.method != "lora":
        raise ConfigError("a peft folder holds LoRA only")
    return found[1], found[2]


def why_not_peft(model: nn.Module) -> str | None:
    """Why a LoRA model's trained tensors do not fit in a peft folder, or None."""
    from medtune.adapters import adapter_state_dict

    _, info = lora_backbone(model)
    extras = [k for k in adapter_state_dict(model) if info.group(k) == "extras"]
    if extras:
        return (f"LoRA with trainable_extras ('{extras[0][len(info.prefix):]}', ...) trains tensors a peft "
                "folder cannot hold; export 'merged' or 'full'")
    return None


def peft_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model``'s backbone in peft's saved names, relative to the timm model:
    ``model.blocks.0.attn.qkv.lora_A.default.weight`` -> ``base_model.model.blocks.0.attn.qkv.lora_A.weight``."""
    from medtune.adapters import adapter_state_dict

    _, info = lora_backbone(model)
    state = {}
    for name, tensor in adapter_state_dict(model).items():
        if info.group(name) != "adapter" or not name.startswith(info.prefix):
            raise ConfigError(f"tensor '{name}' is not a LoRA tensor of the network")
        state[PEFT_PREFIX + _ADAPTER_NAME.sub(r".\1", name[len(info.prefix):])] = tensor
    return state


def peft_lora_config(model: nn.Module):
    """peft's own ``LoraConfig`` of ``model``'s LoRA (the targets it was injected into).

    ``base_model_name_or_path`` stays None, as peft writes it for a timm model: the base is
    the run's own backbone (a pretraining run's encoder, exported with ``--format timm``),
    not a Hub model peft could look up.
    """
    from peft.tuners.lora import LoraLayer

    from medtune.adapters.lora import CANDIDATE_TARGETS

    backbone, info = lora_backbone(model)
    network = backbone.model if info.prefix == "model." else backbone
    targets = list(info.config.target_modules or [])
    if not targets:  # the defaults apply_adapter chose: the candidates that name a LoRA layer
        layers = [n for n, m in network.named_modules() if isinstance(m, LoraLayer)]
        targets = [t for t in CANDIDATE_TARGETS if any(n == t or n.endswith("." + t) for n in layers)]
    config = info.config.peft_config(targets)
    config.inference_mode = True
    return config


def write_peft_folder(model: nn.Module, folder: Path) -> None:
    """``adapter_config.json`` (written by peft) + ``adapter_model.safetensors`` of a LoRA model."""
    why = why_not_peft(model)
    if why is not None:
        raise ConfigError(why)
    save_safetensors(peft_lora_state_dict(model), folder / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    peft_lora_config(model).save_pretrained(str(folder))
    if not (folder / PEFT_CONFIG_FILE).is_file():
        raise CheckpointError(f"peft wrote no {PEFT_CONFIG_FILE} into {folder}")


__all__ = [
    "FAMILY_FORMAT", "MONAI_ENCODER_ATTRIBUTE", "PEFT_PREFIX", "PLAIN_METHODS", "PlainBackbone", "backbone_section",
    "find_backbone", "lora_backbone", "monai_config", "monai_state_dict", "peft_lora_config", "peft_lora_state_dict",
    "plain_backbone", "pretraining_backbone", "timm_architecture", "timm_config", "timm_model_args",
    "timm_state_dict", "why_not_peft", "why_not_plain", "write_backbone", "write_peft_folder",
]
