"""Referring data: RefCOCO layout, JSON lines, masks from polygons/RLE, bad records, truncation."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from medtune.data.referring import (
    ReferringDataset,
    decode_rle,
    load_referring_records,
    rasterize_polygons,
    segmentation_to_mask,
)
from medtune.data.synth import synthesize_referring
from medtune.errors import DataError
from medtune.models.clip import ClipTokenizer


def encode_rle_string(mask: np.ndarray) -> str:
    """Reference encoder of COCO's compressed RLE (written from the format description)."""
    flat = mask.T.flatten()  # column-major
    runs, current, length = [], False, 0
    for value in flat:
        if bool(value) != current:
            runs.append(length)
            current, length = bool(value), 0
        length += 1
    runs.append(length)
    chars = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not chunk & 0x10) or (value == -1 and chunk & 0x10))
            if more:
                chunk |= 0x20
            chars.append(chr(chunk + 48))
    return "".join(chars)


def test_polygon_rasterisation_hand_worked():
    mask = rasterize_polygons([[1, 1, 4, 1, 4, 4, 1, 4]], height=6, width=7)
    assert mask.shape == (6, 7) and mask.sum() == 16
    assert mask[1:5, 1:5].all()
    triangle = rasterize_polygons([[0, 0, 4, 0, 0, 4]], 6, 6)
    assert triangle[0, 0] and triangle[0, 4] and triangle[4, 0] and not triangle[4, 4]


def test_rle_decoding_compressed_and_uncompressed():
    rng = np.random.default_rng(0)
    for shape in [(5, 4), (13, 17), (40, 31)]:
        mask = rng.random(shape) > 0.6
        mask[:3, :3] = True  # long runs too
        decoded = decode_rle({"size": list(shape), "counts": encode_rle_string(mask)})
        assert np.array_equal(decoded, mask)
    # uncompressed counts, hand-worked: 5x4, column-major runs
    mask = np.zeros((5, 4), bool)
    mask[1:3, 1:3] = True
    assert np.array_equal(decode_rle({"size": [5, 4], "counts": [6, 2, 3, 2, 7]}), mask)
    assert np.array_equal(segmentation_to_mask([{"size": [5, 4], "counts": [6, 2, 3, 2, 7]}], 5, 4), mask)


def _write_refcoco(root, with_segmentation=True):
    (root / "refcoco").mkdir(parents=True)
    (root / "images").mkdir()
    Image.new("RGB", (10, 8), (10, 20, 30)).save(root / "images" / "COCO_train2014_000000000001.jpg")
    refs = [
        {"ref_id": 7, "ann_id": 100, "image_id": 1, "split": "val",
         "sentences": [{"sent": "the left box", "sent_id": 1}, {"sent": "box on the left", "sent_id": 2}]},
        {"ref_id": 8, "ann_id": 101, "image_id": 1, "split": "train", "sentences": [{"sent": "right thing", "sent_id": 3}]},
    ]
    with open(root / "refcoco" / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 8, "width": 10}],
        "annotations": [
            {"id": 100, "image_id": 1, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]] if with_segmentation else []},
            {"id": 101, "image_id": 1, "segmentation": {"size": [8, 10], "counts": [70, 8, 2]}},
        ],
    }
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))


def test_refcoco_layout(tmp_path):
    _write_refcoco(tmp_path)
    records = load_referring_records(tmp_path, split="val")
    assert [r.expression for r in records] == ["the left box", "box on the left"]
    assert "ref_id=7" in records[0].source
    dataset = ReferringDataset(records, ClipTokenizer(8), image_size=10)
    assert dataset.load_mask(0).sum() == 16
    sample = dataset[0]
    assert sample["image"].shape == (3, 10, 10) and sample["mask"].shape == (10, 10)
    train = load_referring_records(tmp_path, split="train", layout="refcoco")
    assert len(train) == 1 and dataset.__class__(train, ClipTokenizer(8), 10).load_mask(0).sum() == 8


def test_refcoco_annotation_without_segmentation_names_the_ref(tmp_path):
    _write_refcoco(tmp_path, with_segmentation=False)
    with pytest.raises(DataError, match=r"ref_id=7"):
        load_referring_records(tmp_path, split="val")


def _write_jsonl_case(tmp_path, lines):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    Image.new("L", (8, 6)).save(tmp_path / "a_mask.png")
    Image.new("L", (9, 6)).save(tmp_path / "wrong_mask.png")
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_bad_jsonl_records_name_file_and_line(tmp_path):
    good = {"image": "a.png", "expression": "x", "mask": "a_mask.png"}
    path = _write_jsonl_case(tmp_path, [good, {"image": "missing.png", "expression": "y", "mask": "a_mask.png"}])
    with pytest.raises(DataError, match=r"records\.jsonl:2: image file not found"):
        load_referring_records(path)
    path = _write_jsonl_case(tmp_path, [good, good, {"image": "a.png", "expression": "z", "mask": "nope.png"}])
    with pytest.raises(DataError, match=r"records\.jsonl:3: mask file not found"):
        load_referring_records(path)
    path = _write_jsonl_case(tmp_path, [good, {"image": "a.png", "expression": "z", "mask": "wrong_mask.png"}])
    with pytest.raises(DataError, match=r"records\.jsonl:2: mask wrong_mask\.png is 9x6 but image a\.png is 8x6"):
        load_referring_records(path)
    path = _write_jsonl_case(tmp_path, [{"image": "a.png", "mask": "a_mask.png"}])
    with pytest.raises(DataError, match=r"records\.jsonl:1: record lacks expression"):
        load_referring_records(path)
    records = load_referring_records(_write_jsonl_case(tmp_path, [good]))
    records[0].image.unlink()  # disappears after loading: the dataset names the record too
    with pytest.raises(DataError, match=r"records\.jsonl:1: image file not found"):
        ReferringDataset(records, ClipTokenizer(8), 8)[0]


def test_long_expression_is_truncated_with_a_warning(caplog):
    tokenizer = ClipTokenizer(context_length=8)
    with caplog.at_level(logging.WARNING, logger="medtune.models.clip"):
        tokens = tokenizer(["the small red circle just left of the big blue square in the corner", "red"])
    assert tokens.shape == (2, 8)
    assert any("truncated" in record.message for record in caplog.records)
    assert tokens[0, 0] == tokenizer.sot_id and tokens[0, -1] == tokenizer.eot_id  # still ends with end-of-text
    assert tokens[1].tolist()[:3] == [tokenizer.sot_id, tokens[1, 1].item(), tokenizer.eot_id]
    assert tokenizer.word_positions(tokens).sum(1).tolist() == [6, 1]


def test_generated_shapes_make_the_text_matter(tmp_path):
    path = synthesize_referring(tmp_path, num_images=12, image_size=32, seed=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_image: dict[str, list[dict]] = {}
    for line in lines:
        by_image.setdefault(line["image"], []).append(line)
    assert {line["split"] for line in lines} == {"train", "val"}
    for image, items in by_image.items():
        assert 2 <= len(items) <= 3
        assert len({item["expression"] for item in items}) == len(items)  # unique in its image
        masks = [np.asarray(Image.open(tmp_path / item["mask"])) > 0 for item in items]
        assert all(m.sum() > 10 for m in masks)
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()  # shapes do not overlap
    records = load_referring_records(tmp_path, split="train")
    assert len(records) == sum(line["split"] == "train" for line in lines)
    assert synthesize_referring(tmp_path / "again", 12, 32, seed=3).read_text() == path.read_text()
