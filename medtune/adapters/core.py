"""The adapter registry, ``apply_adapter`` (which freezes, in one place) and parameter counts.

Each tuning method is a small module (``med_tuning.py``, ``lora.py``, ...) holding a
config dataclass, the layer it injects and an :class:`AdapterMethod` subclass that
injects it; they register here by name. Which parameters train is decided once, by
name patterns (relative to the timm network, fnmatch syntax where ``*`` also crosses
dots): the method's own patterns plus ``trainable_extras``.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.targets import AdapterTarget, inspect_backbone
from medtune.checkpoints.counting import count_parameters
from medtune.errors import ConfigError
from medtune.registry import Registry

log = logging.getLogger(__name__)

INFO_ATTR = "medtune_adapter"
"""Attribute of an adapted backbone holding its :class:`AdapterInfo`."""


@dataclass
class AdapterConfig:
    """Settings shared by every tuning method; methods subclass it with their own fields."""

    # registry name of the tuning method: med-tuning, lora, adaptformer, st-adapter,
    # vpt, full, decoder-only
    method: str = "decoder-only"
    # backbone parameters trained besides the method's own, as fnmatch patterns on
    # names relative to the timm network (e.g. "pos_embed", "norm.*"); None: the
    # method's default (Med-Tuning: position embedding and final norm; others: none)
    trainable_extras: list[str] | None = None


@dataclass
class AdapterInfo:
    """What ``apply_adapter`` did to a backbone; kept on it as ``backbone.medtune_adapter``.

    Attributes:
        config: the adapter config.
        family: backbone family (``vit``, ``swin``, ``other``).
        backbone_name: the backbone's name (``adapter.json``'s ``backbone``).
        prefix: name prefix of the timm network inside the backbone (``"model."`` or ``""``).
        own_patterns: names of the method's own parameters (relative to the timm network).
        extra_patterns: names of the trained backbone extras.
        trains_everything: every backbone tensor is trained (full finetuning).
        slice_context: shared by the slice-aware adapters of this backbone.
    """

    config: AdapterConfig
    family: str
    backbone_name: str
    prefix: str
    own_patterns: tuple[str, ...]
    extra_patterns: tuple[str, ...]
    trains_everything: bool = False
    slice_context: SliceContext = field(default_factory=SliceContext)

    def group(self, name: str) -> str | None:
        """``"adapter"``, ``"extras"`` or None (frozen) for a tensor name relative to the backbone."""
        if self.trains_everything:
            return "adapter"
        if not name.startswith(self.prefix):
            return None
        inner = name[len(self.prefix):]
        if any(fnmatch.fnmatchcase(inner, p) for p in self.own_patterns):
            return "adapter"
        if any(fnmatch.fnmatchcase(inner, p) for p in self.extra_patterns):
            return "extras"
        return None


class AdapterMethod:
    """One tuning method: how to inject it and which parameters it trains."""

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    # fnmatch patterns of the method's own parameters, relative to the timm network
    own_patterns: ClassVar[tuple[str, ...]] = ()
    trains_everything: ClassVar[bool] = False
    # whether apply_adapter must be given a ViT/Swin backbone
    needs_blocks: ClassVar[bool] = False

    @classmethod
    def default_extras(cls, family: str) -> tuple[str, ...]:
        return ()

    @classmethod
    def stage_ends(cls, cfg: AdapterConfig) -> list[int] | None:
        return None

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: AdapterConfig, ctx: SliceContext) -> None:
        """Add the method's modules (and hooks) to ``target.model``."""

    @classmethod
    def base_name(cls, name: str) -> str:
        """The name a frozen tensor of the adapted backbone had before injection."""
        return name


ADAPTERS: Registry[type[AdapterMethod]] = Registry("adapter")


def find_adapted(model: nn.Module) -> tuple[str, nn.Module, AdapterInfo] | None:
    """The first module of ``model`` (itself included) that ``apply_adapter`` adapted.

    Returns ``(its name in model, the module, its info)`` or None.
    """
    for name, module in model.named_modules():
        info = getattr(module, INFO_ATTR, None)
        if isinstance(info, AdapterInfo):
            return name, module, info
    return None


def apply_adapter(backbone: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Inject the tuning method ``cfg.method`` into ``backbone`` and freeze the rest, in place.

    Args:
        backbone: a medtune ``Backbone`` (or a bare timm model).
        cfg: the method's config (see :func:`adapter_config_from_dict`).

    Returns:
        ``backbone``, with only the method's parameters and ``trainable_extras``
        requiring grad.
    """
    method = ADAPTERS.get(cfg.method)
    if not isinstance(cfg, method.config_class):
        raise ConfigError(
            f"adapter '{cfg.method}' needs a {method.config_class.__name__}, got {type(cfg).__name__}"
        )
    if find_adapted(backbone) is not None:
        raise ConfigError("backbone already has an adapter; apply_adapter once per backbone")
    target = inspect_backbone(backbone, method.stage_ends(cfg))
    if method.needs_blocks:
        target.require_blocks(cfg.method)

    user_extras = cfg.trainable_extras is not None
    extras = tuple(cfg.trainable_extras) if user_extras else method.default_extras(target.family)
    ctx = SliceContext()
    method.inject(target, cfg, ctx)
    info = AdapterInfo(
        config=cfg,
        family=target.family,
        backbone_name=target.name,
        prefix=target.prefix,
        own_patterns=method.own_patterns,
        extra_patterns=extras,
        trains_everything=method.trains_everything,
        slice_context=ctx,
    )
    setattr(backbone, INFO_ATTR, info)
    _freeze_all_but(backbone, info, check_extras=user_extras)
    total, trainable = count_parameters(backbone)
    log.info(
        "adapter %s on %s: %d of %d parameters trainable (%.2f%%)",
        cfg.method, target.name, trainable, total, 100.0 * trainable / max(total, 1),
    )
    return backbone


def _freeze_all_but(backbone: nn.Module, info: AdapterInfo, check_extras: bool) -> None:
    """The one place that sets ``requires_grad`` on an adapted backbone."""
    for name, param in backbone.named_parameters():
        param.requires_grad_(info.group(name) is not None)
    if check_extras:  # a user's pattern that matches nothing is a typo, not a no-op
        inner = [n[len(info.prefix):] for n, _ in backbone.named_parameters() if n.startswith(info.prefix)]
        for pattern in info.extra_patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in inner):
                raise ConfigError(f"trainable_extras pattern '{pattern}' matches no backbone parameter")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of ``model`` that require grad, by name (what an optimizer gets)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def describe(model: nn.Module) -> dict:
    """Parameter counts of a model with (or without) an adapted backbone inside.

    Returns:
        ``{"method", "backbone", "total", "trainable", "trainable_percent",
        "groups": {"adapter", "extras", "other"}}``; groups count trainable elements:
        ``adapter`` the method's own, ``extras`` trained backbone tensors such as the
        position embedding, ``other`` everything else trainable (e.g. a decoder).
    """
    total, trainable = count_parameters(model)
    groups = {"adapter": 0, "extras": 0, "other": 0}
    found = find_adapted(model)
    info = found[2] if found else None
    prefix = f"{found[0]}." if found and found[0] else ""  # the adapted backbone's name in model
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        group = None
        if info is not None and name.startswith(prefix):
            group = info.group(name[len(prefix):])
        groups[group or "other"] += param.numel()
    return {
        "method": info.config.method if info else None,
        "backbone": info.backbone_name if info else None,
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "groups": groups,
    }
