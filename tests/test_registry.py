"""Registries: a name in a config picks an implementation, exact names before patterns."""

from __future__ import annotations

import pytest

from medtune.errors import ConfigError
from medtune.registry import Registry


def test_registry_exact_and_pattern():
    reg: Registry[int] = Registry("thing")
    reg.register("vit_*")(1)
    reg.register("vit_tiny")(2)
    assert reg.get("vit_tiny") == 2 and reg.get("vit_base") == 1
    assert "vit_x" in reg and "swin" not in reg
    with pytest.raises(ConfigError, match="unknown thing 'swin'"):
        reg.get("swin")
