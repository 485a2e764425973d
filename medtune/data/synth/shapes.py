"""A generated referring-segmentation dataset where the text matters.

Each image holds 2-3 coloured shapes (circle, square, triangle) in separate columns on
a noisy dark background; every shape gets its own expression, so the same image appears
once per shape and only the expression tells which mask is wanted. Expressions name the
target by colour, shape and/or position, e.g. "the red circle", "the blue shape",
"the green square left of the circle", "the triangle on the right"; each one is unique
in its image. A text-blind model can do no better than (about) the union of all shapes.

:func:`synthesize_referring` writes::

    <out>/images/img_00012.png       RGB image
    <out>/masks/img_00012_1.png      mask of shape 1 (0/255)
    <out>/referring.jsonl            {"image", "expression", "mask", "split"} per line

which :func:`medtune.data.referring.load_referring_records` reads (jsonl layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def _expression(rng: np.random.Generator, target: int, items: list[tuple[str, str]]) -> str:
    """A unique description of ``items[target]`` (items ordered left to right)."""
    colour, shape = items[target]
    count = len(items)
    shape_unique = sum(s == shape for _, s in items) == 1
    options = [f"the {colour} {shape}", f"the {colour} shape", f"the {shape} that is {colour}"]
    if shape_unique:
        options.append(f"the {shape}")
    position = {0: "left"} if count == 2 else {0: "left", 1: "middle"}
    position[count - 1] = "right"
    options.append(f"the {shape} on the {position[target]}" if shape_unique else f"the {position[target]} {shape}")
    others = [i for i in range(count) if i != target and sum(s == items[i][1] for _, s in items) == 1]
    if others:
        other = int(rng.choice(others))
        relation = "left of" if target < other else "right of"
        options.append(f"the {colour} {shape} {relation} the {items[other][1]}")
    return str(rng.choice(options))


def synthesize_referring(
    out: str | Path,
    num_images: int = 200,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Path:
    """Write a generated referring dataset under ``out``; returns the ``.jsonl`` path.

    Args:
        out: output folder (created).
        num_images: images; each yields one record per shape (2-3).
        image_size: side of the square images in pixels (>= 24).
        seed: RNG seed (same seed, same files).
        val_fraction: fraction of *images* whose records get ``"split": "val"``.
    """
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 to fit three shapes, got {image_size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    num_val = int(round(val_fraction * num_images))
    for index in range(num_images):
        split = "val" if index < num_val else "train"
        count = int(rng.integers(2, 4))
        colours = [str(c) for c in rng.choice(list(COLOURS), size=count, replace=False)]
        shapes = [str(s) for s in rng.choice(SHAPES, size=count, replace=True)]
        column = image_size / count
        noise = rng.normal(25, 8, size=(image_size, image_size, 3)).clip(0, 255)
        image = Image.fromarray(noise.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        name = f"img_{index:05d}"
        for slot in range(count):
            size = rng.uniform(0.55, 0.9) * min(column, image_size * 0.45)
            left = slot * column + rng.uniform(0, column - size)
            top = rng.uniform(0, image_size - size)
            box = (left, top, left + size - 1, top + size - 1)
            _draw_shape(draw, shapes[slot], box, COLOURS[colours[slot]])
            mask = Image.new("L", (image_size, image_size), 0)
            _draw_shape(ImageDraw.Draw(mask), shapes[slot], box, 255)
            mask.save(out / "masks" / f"{name}_{slot}.png")
        image.save(out / "images" / f"{name}.png")
        items = list(zip(colours, shapes))
        for slot in range(count):
            lines.append(
                {
                    "image": f"images/{name}.png",
                    "expression": _expression(rng, slot, items),
                    "mask": f"masks/{name}_{slot}.png",
                    "split": split,
                }
            )
    path = out / "referring.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
