"""Registries by name, in the spirit of timm's ``create_model``.

A name in a config picks an implementation::

    BACKBONES = Registry("backbone")

    @BACKBONES.register("vit_tiny_patch16_224")
    def build_vit(...): ...

    BACKBONES.get("vit_tiny_patch16_224")(...)

An entry may also be registered by import path, so that listing names costs no
import (``TASKS.register_path("vqa", "medtune.finetune.vqa:TASK")``); the module is
imported the first time the entry is used.
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from medtune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (or glob patterns such as ``"vit_*"``) to builders.

    Exact names win over patterns; patterns are tried in registration order.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def register_path(self, name: str, path: str) -> None:
        """Register ``"package.module:attribute"`` under ``name``, imported on first :meth:`get`."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        if ":" not in path:
            raise ValueError(f"{self.kind} '{name}': import path '{path}' must be 'module:attribute'")
        self._entries[name] = _Lazy(path)  # type: ignore[assignment]

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._resolve(name)
        for pattern in self._entries:
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
                return self._resolve(pattern)
        raise ConfigError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ConfigError:
            return False
        return True

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _resolve(self, key: str) -> T:
        entry = self._entries[key]
        if isinstance(entry, _Lazy):
            module, _, attribute = entry.path.partition(":")
            entry = self._entries[key] = getattr(importlib.import_module(module), attribute)
        return entry


class _Lazy:
    """A registry entry not imported yet."""

    def __init__(self, path: str) -> None:
        self.path = path
