"""A generated VQA-RAD-style set: brain-like slices whose answers depend on the image.

Each slice is a grey brain-like ellipse (wobbly boundary, smooth texture, exactly 0
outside) with 0-2 bright round lesions, all on one side and of one size class. Every
slice gets the questions its facts answer: presence (yes/no) and count for all, side
(left/right) and size (large/small) when it has a lesion. :func:`synthesize_vqa` writes::

    <out>/images/synth_0012.png          grey slice
    <out>/trainset.json, testset.json    VQA-RAD records (qid, image_name, question,
                                         answer, answer_type, question_type)

which :func:`medtune.data.vqa.load_vqa_records` reads with format ``vqa_rad``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedQuestion:
    """A question template of the generated set.

    ``answer_type`` is spelled as VQA-RAD's files spell it (``"CLOSED"``/``"OPEN"``):
    it is written as is, and the ``vqa_rad`` reader turns it into medtune's own.
    """

    kind: str
    text: str
    answer_type: str


GENERATED_QUESTIONS = (
    GeneratedQuestion("presence", "is there a lesion in the brain?", "CLOSED"),
    GeneratedQuestion("count", "how many lesions are there?", "OPEN"),
    GeneratedQuestion("side", "which side of the image is the lesion on?", "OPEN"),
    GeneratedQuestion("size", "is the lesion large or small?", "CLOSED"),
)


def draw_brain_slices(
    count: int, img_size: int, rng: np.random.Generator, max_lesions: int = 2
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw ``count`` grey brain-like slices with 0..``max_lesions`` bright round lesions.

    All lesions of a slice lie on one side (``"left"`` = left half of the image as
    displayed) and share one size class, so "which side" and "large or small" have one
    answer. Returns ``images uint8 (N, s, s)`` and per-slice facts ``lesions (N,)``,
    ``side (N,)`` (0 left, 1 right), ``large (N,)`` bool.
    """
    s = img_size
    yy, xx = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, s), indexing="ij")  # (s, s)
    # brain: an ellipse with a wobbly boundary and smooth texture; background exactly 0
    angle = np.arctan2(yy, xx)[None]  # (1, s, s)
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    wobble = 1 + 0.05 * np.sin(3 * angle + phase)
    axes = rng.uniform(0.75, 0.85, (count, 2, 1, 1))
    brain = ((yy / axes[:, 0]) ** 2 + (xx / axes[:, 1]) ** 2) < wobble**2  # (N, s, s)
    coarse = rng.normal(0, 1, (count, 4, 4))
    texture = np.kron(coarse, np.ones((s // 4 + 1, s // 4 + 1)))[:, :s, :s]  # (N, s, s)
    tissue = 0.45 + 0.05 * texture + 0.03 * rng.normal(0, 1, (count, s, s))

    lesions = rng.integers(0, max_lesions + 1, count)
    side = rng.integers(0, 2, count)
    large = rng.random(count) < 0.5
    radius = np.where(large, 0.22, 0.1)[:, None]  # (N, 1)
    # lesion centres: x inside the chosen half, y spread so two lesions do not overlap
    x_sign = np.where(side == 0, -1.0, 1.0)[:, None]
    centre_x = x_sign * rng.uniform(0.3, 0.45, (count, max_lesions))
    slots = (np.arange(max_lesions) + 0.5) / max_lesions * 1.1 - 0.55  # (K,)
    centre_y = slots[None] + rng.uniform(-0.05, 0.05, (count, max_lesions))
    dist = np.hypot(yy[None, None] - centre_y[..., None, None], xx[None, None] - centre_x[..., None, None])
    present = np.arange(max_lesions)[None] < lesions[:, None]  # (N, K)
    lesion_mask = ((dist < radius[..., None, None]) & present[..., None, None]).any(axis=1)  # (N, s, s)
    image = np.where(lesion_mask, 0.95, tissue) * brain
    images = np.clip(image * 255, 0, 255).astype(np.uint8)
    return images, {"lesions": lesions, "side": side, "large": large}


def _generated_answers(lesions: int, side: int, large: bool) -> list[tuple[GeneratedQuestion, str]]:
    presence, count, side_q, size_q = GENERATED_QUESTIONS
    pairs = [(presence, "yes" if lesions else "no"), (count, str(lesions))]
    if lesions:
        pairs += [(side_q, "left" if side == 0 else "right"), (size_q, "large" if large else "small")]
    return pairs


def synthesize_vqa(
    out_dir: str | Path, images: int = 200, img_size: int = 64, seed: int = 0, test_fraction: float = 0.25
) -> Path:
    """Write a generated VQA set in VQA-RAD's layout (read it with format ``vqa_rad``).

    ``out_dir/images/synth_XXXX.png`` plus ``trainset.json`` and ``testset.json`` whose
    records carry VQA-RAD's fields (``qid``, ``image_name``, ``question``, ``answer``,
    ``answer_type`` CLOSED/OPEN, and ``question_type`` = the question's kind). Images
    are split (not questions), so test images are unseen. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    slices, facts = draw_brain_slices(images, img_size, rng)
    test_count = int(round(images * test_fraction))
    splits: dict[str, list[dict]] = {"trainset.json": [], "testset.json": []}
    for i in range(images):
        name = f"synth_{i:04d}.png"
        Image.fromarray(slices[i]).save(out_dir / "images" / name)
        split = "testset.json" if i >= images - test_count else "trainset.json"
        for question, answer in _generated_answers(int(facts["lesions"][i]), int(facts["side"][i]), bool(facts["large"][i])):
            splits[split].append(
                {
                    "qid": len(splits["trainset.json"]) + len(splits["testset.json"]),
                    "image_name": name,
                    "question": question.text,
                    "answer": answer,
                    "answer_type": question.answer_type,
                    "question_type": question.kind,
                }
            )
    for name, entries in splits.items():
        (out_dir / name).write_text(json.dumps(entries, indent=1) + "\n")
    log.info("wrote a generated VQA set of %d images to %s", images, out_dir)
    return out_dir
