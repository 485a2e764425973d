"""Referring image segmentation data: RefCOCO / RefCOCO+ / G-Ref and a JSON-lines layout.

Every loader turns a dataset's own files into a list of :class:`ReferringRecord`
(image path, expression, where the mask comes from, and ``source``: the file and line
or ref id the record came from, so errors can name it)::

    records = load_referring_records("/data/refer", split="val", dataset="refcoco")
    dataset = ReferringDataset(records, tokenizer, image_size=416)

Layouts:

- ``refcoco`` (the layout of the ``refer`` toolkit, also used by CRIS and LAVT)::

      <root>/refcoco/refs(unc).p      refcoco, refcoco+  ("unc" splits: train/val/testA/testB)
      <root>/refcocog/refs(umd).p     G-Ref ("umd" splits: train/val/test; "google" also read)
      <root>/<dataset>/instances.json COCO-style images + annotations (polygons or RLE)
      <root>/images/                  the COCO train2014 images (also images/train2014/,
                                      or the refer toolkit's images/mscoco/images/train2014/)

  ``refs(*).p`` is a **pickle**: that is the format the dataset ships in. It is read with
  :mod:`pickle` only from the path the user gives (``--data``), never from anything
  downloaded; only open pickles you trust. Each ref holds ``ref_id``, ``ann_id``,
  ``image_id``, ``split`` and ``sentences: [{"sent": ...}]``; one record per sentence.
  Masks are rasterised from the annotation's COCO polygons (PIL, no pycocotools) or
  decoded from its RLE (compressed or not).
- ``jsonl``: one JSON object per line, ``{"image": path, "expression": str, "mask":
  path}`` (paths relative to the file's folder), optional ``"split"``. The mask is a
  PNG (any nonzero pixel is foreground) of the image's size. Medical data included.

Bad input is a :class:`DataError` naming the record (``file:line`` or ``refs file
ref_id=...``): a missing image or mask file, a mask of another size than its image,
an annotation without a segmentation. Expressions longer than the tokenizer's context
are truncated with a logged warning (by the tokenizer), never an error.

Samples (:class:`ReferringDataset`) are dicts of ``image (3, S, S)`` float32 normalised
with CLIP's mean/std, ``mask (S, S)`` float32 in {0, 1}, ``tokens (L,)`` int64 and
``index``; images and masks are resized (bilinear / nearest) to ``S = image_size``,
stretched or letterboxed (aspect kept, padded centred; :func:`logits_to_image` maps
predictions back onto the original image).
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from medtune.data.cases import inside_root
from medtune.errors import DataError

log = logging.getLogger(__name__)

#: CLIP's image normalisation (OpenAI).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

REFS_FILES = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}


@dataclass
class ReferringRecord:
    """One (image, expression, mask) triple.

    mask_path: a mask image file (jsonl layout), or None when ``segmentation`` is set.
    segmentation: a COCO segmentation (polygon list or RLE dict) with the image's
        ``height``/``width`` (refcoco layout).
    source: where the record came from, e.g. ``"train.jsonl:12"`` or
        ``"refcoco/refs(unc).p ref_id=42"``; used in error messages.
    """

    image: Path
    expression: str
    source: str
    mask_path: Path | None = None
    segmentation: Any = None
    height: int = 0
    width: int = 0
    split: str | None = None


# --------------------------------------------------------------------------- loaders


def load_referring_records(
    root: str | Path, split: str | None = None, layout: str = "auto", dataset: str = "refcoco"
) -> list[ReferringRecord]:
    """Records of ``split`` from a ``.jsonl`` file or a RefCOCO-style folder.

    Args:
        root: a ``.jsonl`` file, a folder holding one (``<split>.jsonl`` or
            ``referring.jsonl``), or a refer-toolkit folder.
        split: which split (RefCOCO: train/val/testA/testB/test; jsonl: the records'
            ``"split"`` field); None takes all.
        layout: ``"auto"``, ``"jsonl"`` or ``"refcoco"``.
        dataset: for the refcoco layout, ``refcoco``, ``refcoco+`` or ``refcocog``.
    """
    root = Path(root)
    if layout == "auto":
        layout = "jsonl" if root.suffix == ".jsonl" or _jsonl_in(root, split) is not None else "refcoco"
    if layout == "jsonl":
        path = root if root.suffix == ".jsonl" else _jsonl_in(root, split)
        if path is None:
            raise DataError(f"{root}: no .jsonl file of referring records found")
        return load_jsonl_records(path, split)
    if layout == "refcoco":
        return load_refcoco_records(root, dataset, split)
    raise DataError(f"unknown referring data layout '{layout}' (use auto, jsonl or refcoco)")


def _jsonl_in(folder: Path, split: str | None) -> Path | None:
    if not folder.is_dir():
        return None
    for name in ([f"{split}.jsonl"] if split else []) + ["referring.jsonl"]:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.jsonl"))
    return found[0] if len(found) == 1 else None


def load_jsonl_records(path: str | Path, split: str | None = None) -> list[ReferringRecord]:
    """Read ``{"image", "expression", "mask"[, "split"]}`` lines; check files and sizes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"referring records file not found: {path}")
    records = []
    has_split = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        missing = [key for key in ("image", "expression", "mask") if key not in item]
        if missing:
            raise DataError(f"{where}: record lacks {', '.join(missing)}")
        has_split |= "split" in item
        if split is not None and item.get("split", split) != split:
            continue
        record = ReferringRecord(
            image=inside_root(path.parent, item["image"], path),
            expression=str(item["expression"]),
            source=where,
            mask_path=inside_root(path.parent, item["mask"], path),
            split=item.get("split"),
        )
        _check_files(record)
        records.append(record)
    if split is not None and not has_split:
        log.warning("%s: records have no 'split' field; using all of them for split '%s'", path, split)
    if not records:
        raise DataError(f"{path}: no records" + (f" of split '{split}'" if split else ""))
    return records


def _check_files(record: ReferringRecord) -> None:
    """Missing files or a mask of another size than its image -> DataError naming the record."""
    for kind, file in (("image", record.image), ("mask", record.mask_path)):
        if not file.is_file():
            raise DataError(f"{record.source}: {kind} file not found: {file}")
    image_size, mask_size = _image_size(record.image, record), _image_size(record.mask_path, record)
    if image_size != mask_size:
        raise DataError(
            f"{record.source}: mask {record.mask_path.name} is {mask_size[0]}x{mask_size[1]} "
            f"but image {record.image.name} is {image_size[0]}x{image_size[1]} (width x height)"
        )


def _image_size(path: Path, record: ReferringRecord) -> tuple[int, int]:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except OSError as exc:
        raise DataError(f"{record.source}: cannot read {path} ({exc})") from None


def load_refcoco_records(root: str | Path, dataset: str = "refcoco", split: str | None = None) -> list[ReferringRecord]:
    """Records of the refer toolkit layout (see the module docstring); one per sentence."""
    root = Path(root)
    if dataset not in REFS_FILES:
        raise DataError(f"unknown RefCOCO dataset '{dataset}' (use {', '.join(REFS_FILES)})")
    folder = root / dataset if (root / dataset).is_dir() else root
    refs_path = folder / REFS_FILES[dataset]
    if not refs_path.is_file() and dataset == "refcocog":
        refs_path = folder / "refs(google).p"
    instances_path = folder / "instances.json"
    for file in (refs_path, instances_path):
        if not file.is_file():
            raise DataError(f"{root}: RefCOCO layout needs {file} (refer toolkit layout)")
    candidates = (root / "images" / "mscoco" / "images" / "train2014", root / "images" / "train2014",
                  root / "images", folder / "images")
    image_dir = next((d for d in candidates if d.is_dir()), None)
    if image_dir is None:
        raise DataError(f"{root}: no images/ folder (COCO train2014 images)")
    refs = _read_refs_pickle(refs_path)
    try:
        instances = json.loads(instances_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{instances_path}: not valid JSON ({exc.msg})") from None
    images = {img["id"]: img for img in instances.get("images", [])}
    annotations = {ann["id"]: ann for ann in instances.get("annotations", [])}
    records = []
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        where = f"{refs_path} ref_id={ref.get('ref_id')}"
        ann = annotations.get(ref.get("ann_id"))
        info = images.get(ref.get("image_id"))
        if ann is None or info is None:
            raise DataError(f"{where}: annotation {ref.get('ann_id')} or image {ref.get('image_id')} not in {instances_path}")
        if not ann.get("segmentation"):
            raise DataError(f"{where}: annotation {ann['id']} has no segmentation")
        for sentence in ref.get("sentences", []):
            records.append(
                ReferringRecord(
                    image=image_dir / info["file_name"],
                    expression=str(sentence.get("sent", sentence.get("raw", ""))),
                    source=f"{where} sent_id={sentence.get('sent_id')}",
                    segmentation=ann["segmentation"],
                    height=int(info["height"]),
                    width=int(info["width"]),
                    split=ref.get("split"),
                )
            )
    if not records:
        raise DataError(f"{refs_path}: no referring expressions" + (f" of split '{split}'" if split else ""))
    return records


def _read_refs_pickle(path: Path) -> list[dict]:
    """The refer toolkit's ``refs(*).p``: a pickle, the dataset's own format, read only
    from the path the user named. The files were written by Python 2, so non-ASCII
    strings need ``encoding="latin1"``."""
    for encoding in ("ASCII", "latin1"):
        try:
            with open(path, "rb") as handle:
                refs = pickle.load(handle, encoding=encoding)
            break
        except UnicodeDecodeError:
            continue
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise DataError(f"{path}: not a refer-toolkit refs pickle ({exc})") from None
    else:
        raise DataError(f"{path}: cannot decode the refs pickle's strings")
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


# --------------------------------------------------------------------------- masks


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> ``(height, width)`` bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)]
        if len(points) >= 3:
            draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> run lengths (LEB128-like 5-bit groups, delta coded)."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position += 1
            shift += 1
            if not more and (chunk & 0x10):
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE ``{"size": [h, w], "counts": str | list}`` -> ``(h, w)`` bool mask."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate background, foreground, starting with background
    flat = np.repeat(values, runs)
    if flat.size != height * width:
        raise ValueError(f"RLE covers {flat.size} pixels, expected {height * width}")
    return flat.reshape(width, height).T  # COCO RLE runs down columns (Fortran order)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE dict or a list of RLE dicts) -> bool mask."""
    if isinstance(segmentation, dict):
        return decode_rle(segmentation)
    if segmentation and isinstance(segmentation[0], dict):
        return np.logical_or.reduce([decode_rle(rle) for rle in segmentation])
    return rasterize_polygons(segmentation, height, width)


# --------------------------------------------------------------------------- dataset


class ReferringDataset(Dataset):
    """Tokenised expressions with resized, normalised images and binary masks.

    Args:
        records: from :func:`load_referring_records`.
        tokenizer: ``tokenizer(list[str]) -> (N, L) long`` (e.g. ``ClipTokenizer``);
            tokenised once here (truncation warnings appear at construction).
        image_size: side S of the square model input.
        cache: keep decoded, resized images and masks in memory (small datasets).
        letterbox: keep the aspect ratio (scale the long side to S, pad the short side
            centred with CLIP's mean colour, mask padding 0) instead of stretching.
    """

    def __init__(
        self,
        records: Sequence[ReferringRecord],
        tokenizer: Callable[[list[str]], torch.Tensor],
        image_size: int,
        cache: bool = False,
        letterbox: bool = False,
    ) -> None:
        if not records:
            raise DataError("referring dataset has no records")
        self.records = list(records)
        self.image_size = image_size
        self.letterbox = letterbox
        self.tokens = tokenizer([r.expression for r in self.records])  # [N, L]
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def load_mask(self, index: int) -> np.ndarray:
        """The record's full-resolution ``(H, W)`` bool mask."""
        record = self.records[index]
        if record.mask_path is not None:
            if not record.mask_path.is_file():
                raise DataError(f"{record.source}: mask file not found: {record.mask_path}")
            with Image.open(record.mask_path) as mask:
                return np.asarray(mask.convert("L")) > 0
        try:
            return segmentation_to_mask(record.segmentation, record.height, record.width)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise DataError(f"{record.source}: bad segmentation ({exc})") from None

    def load_image(self, index: int) -> Image.Image:
        record = self.records[index]
        if not record.image.is_file():
            raise DataError(f"{record.source}: image file not found: {record.image}")
        try:
            with Image.open(record.image) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise DataError(f"{record.source}: cannot read image {record.image} ({exc})") from None

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        image = self.load_image(index)
        mask = self.load_mask(index)
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"{record.source}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{record.image.name} is {image.width}x{image.height} (width x height)"
            )
        pixels = to_model_pixels(image, self.image_size, self.letterbox)  # [3, S, S] uint8
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
        target = fit_to_square(mask_image, self.image_size, self.letterbox, Image.NEAREST, 0)
        return pixels, torch.from_numpy(np.asarray(target) > 127)  # [S, S]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            pixels, target = self._cache[index]
        else:
            pixels, target = self._load(index)
            if self._cache is not None:
                self._cache[index] = (pixels, target)
        image = (pixels.float() / 255.0 - self.mean) / self.std
        return {
            "image": image,
            "mask": target.float(),
            "tokens": self.tokens[index],
            "index": torch.tensor(index),
        }


@dataclass(frozen=True)
class SquareFit:
    """Where an ``width x height`` image lands in the ``size x size`` model input."""

    width: int
    height: int
    size: int
    letterbox: bool

    @property
    def scaled(self) -> tuple[int, int]:
        """(width, height) of the resized image inside the square."""
        if not self.letterbox:
            return self.size, self.size
        scale = self.size / max(self.width, self.height)
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))

    @property
    def offset(self) -> tuple[int, int]:
        """(left, top) padding of the resized image inside the square."""
        scaled_w, scaled_h = self.scaled
        return (self.size - scaled_w) // 2, (self.size - scaled_h) // 2


def fit_to_square(image: Image.Image, size: int, letterbox: bool, resample, fill) -> Image.Image:
    """Resize ``image`` to ``size x size``: stretched, or letterboxed (padded with ``fill``)."""
    fit = SquareFit(image.width, image.height, size, letterbox)
    resized = image.resize(fit.scaled, resample)
    if not letterbox:
        return resized
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(resized, fit.offset)
    return canvas


def to_model_pixels(image: Image.Image, size: int, letterbox: bool) -> torch.Tensor:
    """RGB PIL image -> ``(3, S, S)`` uint8; letterbox padding is CLIP's mean colour (0 once normalised)."""
    mean_colour = tuple(round(255 * m) for m in CLIP_MEAN)
    square = fit_to_square(image.convert("RGB"), size, letterbox, Image.BILINEAR, mean_colour)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)


def preprocess_image(image: Image.Image, image_size: int, letterbox: bool = False) -> torch.Tensor:
    """A PIL image -> ``(3, S, S)`` float32 CLIP-normalised model input (for prediction)."""
    pixels = to_model_pixels(image, image_size, letterbox).float() / 255.0
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def logits_to_image(
    logits: torch.Tensor, height: int, width: int, letterbox: bool, input_size: int | None = None
) -> torch.Tensor:
    """Model-input-frame logits ``(..., h, w)`` -> ``(..., height, width)`` on the original image.

    The square logits are resized to the model input size S (``input_size``; default
    their own size), the letterbox padding is cropped, and the rest is resized to the image.
    """
    import torch.nn.functional as F

    lead = logits.shape[:-2]
    flat = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    if letterbox:
        size = input_size or flat.shape[-1]
        if flat.shape[-1] != size:
            flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
        fit = SquareFit(width, height, size, True)
        (scaled_w, scaled_h), (left, top) = fit.scaled, fit.offset
        flat = flat[..., top : top + scaled_h, left : left + scaled_w]
    flat = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False)
    return flat.reshape(*lead, height, width)
