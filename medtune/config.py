"""Configs as dataclasses, loaded from YAML with strict keys.

Every run is described by a dataclass tree (see e.g. ``medtune.pretrain.config``).
``load_config`` reads a YAML file, applies ``--set a.b=value`` overrides to the raw
mapping, then builds the dataclasses; a key that no dataclass declares is an error that
names the key's full path, never silently ignored.

A section can be a *tagged union*: one of its keys picks its dataclass, as
``objective.name`` picks ``MAEConfig`` or ``FreMAEConfig``. The declared class says so
with ``variant_key`` (the picking field) and a classmethod ``variant_classes()``
(``{value: dataclass}``, each a subclass of the declared class)::

    @dataclass
    class ObjectiveConfig:
        name: str = "fremae"
        variant_key: ClassVar[str] = "name"

        @classmethod
        def variant_classes(cls) -> dict[str, type]:
            return {"fremae": FreMAEConfig, "mae": MAEConfig}

``from_dict(ObjectiveConfig, {"name": "mae", ...})`` then builds a ``MAEConfig`` with
its own strict keys (a missing ``name`` picks the declared class's default), and
``to_dict`` writes the variant's fields, ``name`` included, so the two round-trip.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union

import yaml

from medtune.errors import ConfigError

C = TypeVar("C")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=5"`` -> ``(["train", "max_steps"], 5)``; the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=value`` in the nested mapping ``data`` (in place, returned); a number
    indexes a list (``model.backbones.0.pretrained=RUN``)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if isinstance(node, list):
                node = node[_list_index(node, part, text)]
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(node, path[-1], text)] = value
        else:
            node[path[-1]] = value
    return data


def _list_index(items: list, part: str, text: str) -> int:
    if not str(part).isdigit() or int(part) >= len(items):
        raise ConfigError(f"override '{text}': '{part}' is not an index of a list of {len(items)}")
    return int(part)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _convert(value: Any, tp: Any, where: str) -> Any:
    if value is None:
        return None
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{where}' must be a section, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp in (int, float) and isinstance(value, bool):  # YAML true/false are not numbers
        raise ConfigError(f"config key '{where}' must be {tp.__name__}, got {value!r} (a boolean)")
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot in the mantissa) as a string; it is a float
        try:
            value = float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{where}' must be a finite number, got {value!r}")
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(
            f"config key '{where}' must be {tp.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _key_path(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def variant_class(cls: type[C], data: Mapping[str, Any], where: str = "") -> type[C]:
    """The dataclass that builds ``data``: ``cls`` itself, or for a tagged union (see the
    module docstring) the variant named by ``data[cls.variant_key]``, or by ``cls``'s
    default for that key when ``data`` has none."""
    key = getattr(cls, "variant_key", None)
    if key is None:
        return cls
    variants = cls.variant_classes()
    path = _key_path(where, key)
    tag = data.get(key, _init_fields(cls)[key].default)
    if tag is dataclasses.MISSING:
        raise ConfigError(f"config key '{path}' is required (one of: {', '.join(variants)})")
    variant = variants.get(tag) if isinstance(tag, str) else None
    if variant is None:
        raise ConfigError(f"unknown {path} {tag!r} (known: {', '.join(variants)})")
    if not issubclass(variant, cls):
        raise ConfigError(f"{path} '{tag}' is a {variant.__name__}, not a {cls.__name__}")
    return variant


def _unknown_keys_message(cls: type, data: Mapping[str, Any], unknown: list, where: str) -> str:
    """One line naming the unknown keys by full path; for a variant of a tagged union, also
    which variants they belong to (e.g. keys left over after changing ``objective.name``)."""
    full = ", ".join(_key_path(where, k) for k in unknown)
    fields = _init_fields(cls)
    known = ", ".join(fields)
    key = getattr(cls, "variant_key", None)
    if key is None:
        return f"unknown config key '{full}' (known: {known})"
    others = {name: _init_fields(v) for name, v in cls.variant_classes().items() if v is not cls}
    owners: dict[tuple[str, ...], list[str]] = {}
    for unknown_key in unknown:
        names = tuple(name for name, other_fields in others.items() if unknown_key in other_fields)
        if names:
            owners.setdefault(names, []).append(str(unknown_key))
    belong = "; ".join(
        f"{', '.join(keys)} {'belongs' if len(keys) == 1 else 'belong'} to {', '.join(repr(n) for n in names)}"
        for names, keys in owners.items()
    )
    tag = data.get(key, fields[key].default)
    section = f"{where} {tag!r}" if where else cls.__name__
    verb = "is not a key" if len(unknown) == 1 else "are not keys"
    return f"{full} {verb} of {section}{f' ({belong})' if belong else ''}; its keys: {known}"


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "", base: Any = None) -> C:
    """Build dataclass ``cls`` (for a tagged union: the variant that ``data`` names) from a
    mapping; unknown keys raise :class:`ConfigError`.

    A section given in part keeps the rest of its default: ``train: {lr: ...}`` changes
    the learning rate of the ``train`` section's default (which may differ from the
    section class's own defaults, e.g. a task's default crop size), section by section.
    ``base`` is that default for ``cls`` itself (an instance of it, or None).
    """
    key = getattr(cls, "variant_key", None)
    if key is not None and key not in data and isinstance(base, cls):
        cls = type(base)  # a tagged union given in part stays the variant of its default
    cls = variant_class(cls, data, where)
    if base is not None and type(base) is not cls:
        base = None  # another variant was chosen: its keys start from their own defaults
    hints = typing.get_type_hints(cls)
    fields = _init_fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(_unknown_keys_message(cls, data, unknown, where))
    kwargs = {}
    for name, field in fields.items():
        default = getattr(base, name) if base is not None else _field_default(field)
        if name in data:
            value, path = data[name], _key_path(where, name)
            section = _strip_optional(hints[name])
            if isinstance(value, Mapping) and dataclasses.is_dataclass(section) and dataclasses.is_dataclass(default):
                kwargs[name] = from_dict(section, value, path, base=default)
            else:
                kwargs[name] = _convert(value, hints[name], path)
        elif base is not None:
            kwargs[name] = copy.deepcopy(default)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"config section '{where or cls.__name__}': {exc}") from None
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"config section '{where or cls.__name__}': {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain-data mapping of a config dataclass (tuples become lists, for JSON/YAML)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(dataclasses.asdict(cfg))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read YAML ``path`` (or start from defaults), apply overrides, build ``cls``."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
