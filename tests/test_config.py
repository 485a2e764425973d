"""Strict configs: dataclasses from YAML mappings, --set overrides, sections given in part,
tagged unions picked by their key, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from medtune.config import apply_overrides, from_dict, load_config, to_dict
from medtune.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Outer:
    name: str = "fremae"
    steps: int = 10
    path: str | None = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_from_dict_builds_nested_and_converts_types():
    cfg = from_dict(Outer, {"steps": 5.0, "inner": {"lr": 1, "betas": [0.5, 0.6]}, "tags": ["a"]})
    assert cfg.steps == 5 and isinstance(cfg.steps, int)
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.betas == (0.5, 0.6)
    assert to_dict(cfg)["inner"]["betas"] == [0.5, 0.6]


@dataclass
class Recipe:
    """A section whose default differs from its class's defaults (as a task's crop size does)."""

    outer: Outer = field(default_factory=lambda: Outer(steps=99, inner=Inner(lr=0.5)))
    shape: Shape = field(default_factory=lambda: Square(side=7))


def test_a_section_given_in_part_keeps_the_rest_of_its_default():
    cfg = from_dict(Recipe, {"outer": {"name": "mae"}})
    assert cfg.outer == Outer(name="mae", steps=99, inner=Inner(lr=0.5))  # not Outer's own steps=10
    cfg = from_dict(Recipe, {"outer": {"inner": {"betas": [0.1, 0.2]}}})
    assert cfg.outer.steps == 99 and cfg.outer.inner == Inner(lr=0.5, betas=(0.1, 0.2))  # section by section
    assert from_dict(Recipe, {"shape": {"radius": 1.5}}).shape == Square(side=7, radius=1.5)
    # choosing another variant starts from that variant's own defaults
    assert from_dict(Recipe, {"shape": {"kind": "circle"}}).shape == Circle()
    assert from_dict(Recipe, {}) == Recipe()
    assert Recipe().outer.inner is not from_dict(Recipe, {"outer": {}}).outer.inner  # no shared defaults


def test_unknown_key_names_its_full_path():
    with pytest.raises(ConfigError, match=r"inner\.lrr"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'steps'"):
        from_dict(Outer, {"steps": "many"})


def test_overrides_apply_yaml_values(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mae\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["inner.lr=0.25", "steps=7", "path=null", "tags=[x, y]"])
    assert (cfg.name, cfg.steps, cfg.inner.lr, cfg.path, cfg.tags) == ("mae", 7, 0.25, None, ["x", "y"])
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(Outer, path, ["inner.nope=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["steps"])


def test_overrides_index_lists_by_number():
    data = {"model": {"backbones": [{"name": "a"}, {"name": "b"}], "bits": [8, 16]}}
    apply_overrides(data, ["model.backbones.1.pretrained=runs/x", "model.bits.0=4"])
    assert data == {"model": {"backbones": [{"name": "a"}, {"name": "b", "pretrained": "runs/x"}], "bits": [4, 16]}}
    for bad in ("model.backbones.2.name=c", "model.backbones.first.name=c"):
        with pytest.raises(ConfigError, match="is not an index of a list of 2"):
            apply_overrides(data, [bad])


@dataclass
class Shape:
    """A tagged union: ``kind`` picks the dataclass."""

    kind: str = "circle"
    variant_key: ClassVar[str] = "kind"

    @classmethod
    def variant_classes(cls) -> dict[str, type]:
        return {"circle": Circle, "square": Square}


@dataclass
class Circle(Shape):
    kind: str = "circle"
    radius: float = 1.0


@dataclass
class Square(Shape):
    kind: str = "square"
    side: int = 2
    radius: float = 0.0  # of the rounded corners: a key of both variants


@dataclass
class Drawing:
    shape: Shape = field(default_factory=Circle)
    layers: list[Shape] = field(default_factory=list)


def test_tagged_union_picks_the_variant_by_its_key():
    cfg = from_dict(Drawing, {"shape": {"kind": "square", "side": 3.0}, "layers": [{"kind": "square"}, {"radius": 2}]})
    assert cfg.shape == Square(side=3) and isinstance(cfg.shape.side, int)
    assert cfg.layers == [Square(), Circle(radius=2.0)]  # no kind: the declared class's default, circle
    assert from_dict(Drawing, {}).shape == Circle()
    assert from_dict(Drawing, {"shape": {}}).shape == Circle()
    assert from_dict(Shape, {"kind": "square"}) == Square()
    # a variant asked for by its own class keeps its own default
    assert from_dict(Square, {"side": 5}) == Square(side=5)


def test_tagged_union_round_trips_through_to_dict():
    cfg = from_dict(Drawing, {"shape": {"kind": "square", "side": 4}, "layers": [{"radius": 0.5}]})
    data = to_dict(cfg)
    assert data == {"shape": {"kind": "square", "side": 4, "radius": 0.0}, "layers": [{"kind": "circle", "radius": 0.5}]}
    assert from_dict(Drawing, data) == cfg


def test_tagged_union_key_of_another_variant_names_path_and_owner():
    with pytest.raises(ConfigError) as info:
        from_dict(Drawing, {"shape": {"kind": "circle", "side": 3}})
    assert str(info.value) == "shape.side is not a key of shape 'circle' (side belongs to 'square'); its keys: kind, radius"
    with pytest.raises(ConfigError) as info:
        from_dict(Drawing, {"layers": [{}, {"kind": "square", "sides": 4, "colour": "red"}]})
    assert str(info.value) == "layers[1].sides, layers[1].colour are not keys of layers[1] 'square'; its keys: kind, side, radius"
    with pytest.raises(ConfigError, match=r"^side is not a key of Circle \(side belongs to 'square'\)"):
        from_dict(Shape, {"side": 3})


def test_tagged_union_unknown_variant_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        from_dict(Drawing, {"shape": {"kind": "hexagon", "side": 3}})
    assert str(info.value) == "unknown shape.kind 'hexagon' (known: circle, square)"
    with pytest.raises(ConfigError, match=r"unknown shape.kind None \(known: circle, square\)"):
        from_dict(Drawing, {"shape": {"kind": None}})
    with pytest.raises(ConfigError, match="shape.kind 'square' is a Square, not a Circle"):
        from_dict(Circle, {"kind": "square"}, "shape")
