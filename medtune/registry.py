"""Registries by name, in the spirit of timm's ``create_model``.

A name in a config picks an implementation::

    BACKBONES = Registry("backbone")

    @BACKBONES.register("vit_tiny_patch16_224")
    def build_vit(...): ...

    BACKBONES.get("vit_tiny_patch16_224")(...)
"""

from __future__ import annotations

import fnmatch
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

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        for pattern, obj in self._entries.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
                return obj
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
