"""Medical visual question answering data: VQA-RAD, SLAKE, VQA-Med-2019 and a generated set.

Every loader turns a dataset's own files into a list of :class:`VQARecord` (image path,
question, normalised answer, answer type ``"closed"``/``"open"``); the rest of medtune
only sees records::

    records = load_vqa_records("slake", "/data/Slake1.0", split="train")
    vocab = AnswerVocab.from_records(records)          # answers of the TRAINING split
    dataset = VQADataset(records, vocab, tokenize, img_size=224, in_chans=3)

Layouts read (field names as the datasets ship them):

- ``vqa_rad``: either MEVF-style ``trainset.json`` / ``testset.json`` next to an image
  folder, or the original ``VQA_RAD Dataset Public.json`` whose ``phrase_type``
  (``freeform``/``para`` vs ``test_freeform``/``test_para``) gives the split. Records
  have ``image_name``, ``question``, ``answer``, ``answer_type`` (``CLOSED``/``OPEN``).
  Images in ``images/``, ``VQA_RAD Image Folder/`` or the root.
- ``slake``: ``train.json`` / ``validate.json`` / ``test.json`` with ``img_name``
  (e.g. ``xmlab102/source.jpg``, relative to ``imgs/``), ``question``, ``answer``,
  ``answer_type``, ``q_lang`` (``en``/``zh``; English only by default).
- ``vqa_med_2019``: the ImageCLEF release is pipe-separated text, not JSON:
  ``<image id>|<question>|<answer>`` (train/validation ``All_QA_Pairs_*.txt``) or
  ``<image id>|<category>|<question>|<answer>`` (test), images ``<image id>.jpg`` in the
  split's image folder. It has no answer types; yes/no answers count as closed.
- ``generated``: :func:`medtune.data.synth.synthesize_vqa` writes a small VQA-RAD-style
  set of brain-like slices whose answers depend on the image (presence, count, side and
  size of lesions); it is read as ``vqa_rad``.

Images are read with PIL, resized to ``img_size`` and cached as ``uint8`` arrays (one
decode per image, however many questions it has); items are z-scored per channel over
their nonzero pixels with the volumetric preprocessing's own
:func:`~medtune.data.preprocess.zscore_nonzero`, so a backbone pretrained on BraTS
slices sees familiar statistics.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medtune.data.preprocess import zscore_nonzero
from medtune.data.cases import inside_root
from medtune.errors import DataError
from medtune.registry import Registry

CLOSED = "closed"
OPEN = "open"
YES_NO = frozenset({"yes", "no"})


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    ``source`` names the record for error messages: ``<file>#<qid or index>``.
    """

    image: Path
    question: str
    answer: str
    answer_type: str  # CLOSED or OPEN
    source: str


def normalize_answer(answer: object) -> str:
    """Lower case, single spaces, no trailing full stop: ``" Yes. "`` -> ``"yes"``."""
    text = re.sub(r"\s+", " ", str(answer).strip().lower())
    return text.rstrip(".").strip()


def _answer_type(raw: object, answer: str, where: str) -> str:
    if raw is None or str(raw).strip() == "":
        return CLOSED if answer in YES_NO else OPEN
    kind = str(raw).strip().lower()
    if kind not in (CLOSED, OPEN):
        raise DataError(f"{where}: answer_type {raw!r} is neither CLOSED nor OPEN")
    return kind


def _read_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read VQA records ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of question records")
    return data


def _field(entry: dict, key: str, where: str) -> object:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: record has no field '{key}'")
    return entry[key]


def _records_from_json(
    entries: Iterable[tuple[int, dict]], path: Path, image_dir: Path, image_key: str
) -> list[VQARecord]:
    records = []
    for index, entry in entries:
        where = f"{path}#{entry.get('qid', index) if isinstance(entry, dict) else index}"
        answer = normalize_answer(_field(entry, "answer", where))
        records.append(
            VQARecord(
                image=inside_root(image_dir, str(_field(entry, image_key, where)), where),
                question=str(_field(entry, "question", where)).strip(),
                answer=answer,
                answer_type=_answer_type(entry.get("answer_type"), answer, where),
                source=where,
            )
        )
    return records


VQA_FORMATS: Registry[Callable[..., list[VQARecord]]] = Registry("vqa dataset format")

_VQA_RAD_SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}
_VQA_RAD_PUBLIC_FILE = "VQA_RAD Dataset Public.json"


def _first_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


@VQA_FORMATS.register("vqa_rad")
def load_vqa_rad(root: str | Path, split: str = "train", image_dir: str | None = None) -> list[VQARecord]:
    """VQA-RAD records of ``split`` (``train`` or ``test``); see the module docstring."""
    root = Path(root)
    if split not in _VQA_RAD_SPLIT_FILES:
        raise DataError(f"{root}: VQA-RAD has splits train/test, not '{split}'")
    images = Path(image_dir) if image_dir else _first_dir(root, ("images", "VQA_RAD Image Folder"))
    split_file = root / _VQA_RAD_SPLIT_FILES[split]
    if split_file.is_file():
        return _records_from_json(enumerate(_read_json_list(split_file)), split_file, images, "image_name")
    public = root / _VQA_RAD_PUBLIC_FILE
    if not public.is_file():
        raise DataError(f"{root}: neither {split_file.name} nor '{_VQA_RAD_PUBLIC_FILE}' found (VQA-RAD)")
    entries = _read_json_list(public)

    def is_test(entry: dict) -> bool:
        return str(entry.get("phrase_type", "")).startswith("test")

    chosen = [(i, e) for i, e in enumerate(entries) if is_test(e) == (split == "test")]
    return _records_from_json(chosen, public, images, "image_name")


_SLAKE_SPLIT_FILES = {"train": "train.json", "validate": "validate.json", "val": "validate.json", "test": "test.json"}


@VQA_FORMATS.register("slake")
def load_slake(
    root: str | Path, split: str = "train", image_dir: str | None = None, languages: Sequence[str] = ("en",)
) -> list[VQARecord]:
    """SLAKE records of ``split`` (``train``/``validate``/``test``), questions in ``languages``."""
    root = Path(root)
    if split not in _SLAKE_SPLIT_FILES:
        raise DataError(f"{root}: SLAKE has splits train/validate/test, not '{split}'")
    path = root / _SLAKE_SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path}: SLAKE split file not found")
    images = Path(image_dir) if image_dir else _first_dir(root, ("imgs",))
    wanted = set(languages)
    chosen = [(i, e) for i, e in enumerate(_read_json_list(path)) if e.get("q_lang", "en") in wanted]
    return _records_from_json(chosen, path, images, "img_name")


# split -> (QA text file pattern, image folder pattern), searched recursively under root
_VQA_MED_2019_SPLITS = {
    "train": ("All_QA_Pairs_train*.txt", "Train_images"),
    "validation": ("All_QA_Pairs_val*.txt", "Val_images"),
    "test": ("VQAMed2019_Test_Questions_w_Ref_Answers*.txt", "VQAMed2019_Test_Images"),
}


@VQA_FORMATS.register("vqa_med_2019")
def load_vqa_med_2019(root: str | Path, split: str = "train", image_dir: str | None = None) -> list[VQARecord]:
    """ImageCLEF VQA-Med 2019 records of ``split`` (``train``/``validation``/``test``)."""
    root = Path(root)
    if split not in _VQA_MED_2019_SPLITS:
        raise DataError(f"{root}: VQA-Med-2019 has splits train/validation/test, not '{split}'")
    qa_pattern, image_pattern = _VQA_MED_2019_SPLITS[split]
    qa_files = sorted(root.rglob(qa_pattern))
    if not qa_files:
        raise DataError(f"{root}: no '{qa_pattern}' found (VQA-Med-2019 {split} split)")
    path = qa_files[0]
    if image_dir:
        images = Path(image_dir)
    else:
        found = sorted(p for p in root.rglob(image_pattern) if p.is_dir())
        images = found[0] if found else path.parent
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        where = f"{path}:{number}"
        if len(fields) == 3:
            image_id, question, answer = fields
        elif len(fields) == 4:
            image_id, _category, question, answer = fields
        else:
            raise DataError(f"{where}: expected 'image|question|answer', got {len(fields)} fields")
        answer = normalize_answer(answer)
        records.append(
            VQARecord(inside_root(images, f"{image_id.strip()}.jpg", where), question.strip(), answer,
                      _answer_type(None, answer, where), where)
        )
    return records


def load_vqa_records(fmt: str, root: str | Path, split: str, **options: object) -> list[VQARecord]:
    """Records of dataset format ``fmt`` (``vqa_rad``, ``slake``, ``vqa_med_2019``)."""
    if not Path(root).is_dir():
        raise DataError(f"VQA dataset folder not found: {root}")
    records = VQA_FORMATS.get(fmt)(root, split, **options)
    if not records:
        raise DataError(f"{root}: the {fmt} '{split}' split holds no questions")
    return records


def check_images(records: Sequence[VQARecord]) -> None:
    """Raise :class:`DataError` naming the first record whose image file is missing."""
    seen: dict[Path, bool] = {}
    for record in records:
        exists = seen.setdefault(record.image, record.image.is_file())
        if not exists:
            raise DataError(f"{record.source}: image not found: {record.image}")


class AnswerVocab:
    """Answers as classes, closed and open together; built from the training split.

    ``encode`` gives ``-1`` for an answer it does not know (an evaluation answer never
    seen in training): the metric counts it wrong, it never crashes.
    """

    UNKNOWN = -1

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.index = {answer: i for i, answer in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise DataError("answer vocabulary holds an answer twice")

    @classmethod
    def from_records(cls, records: Sequence[VQARecord], min_count: int = 1) -> "AnswerVocab":
        """Answers seen at least ``min_count`` times, most frequent first (ties by name)."""
        counts = Counter(record.answer for record in records)
        kept = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.answers)

    def encode(self, answer: str) -> int:
        return self.index.get(normalize_answer(answer), self.UNKNOWN)

    def decode(self, index: int) -> str:
        return self.answers[index]


def load_image(path: Path, img_size: int, in_chans: int, source: str = "") -> np.ndarray:
    """Read an image as ``uint8 (C, img_size, img_size)``; C = 3 for RGB, else grey repeated.

    Medical images are grey; a backbone with ``in_chans`` other than 3 (e.g. 4 BraTS
    modalities) sees the grey image in every channel.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if in_chans == 3 else "L")
            image = image.resize((img_size, img_size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{source or path}: cannot read image {path} ({str(exc).splitlines()[0]})") from None
    if array.ndim == 2:
        return np.repeat(array[None], in_chans, axis=0)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


# tokenize(questions) -> (ids (N, L) long, mask (N, L) bool); see medtune.models.text
Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


class VQADataset(Dataset):
    """Items ``{"image": (C, s, s) float32, "question_ids": (L,) long, "question_mask": (L,)
    bool, "answer": () long (-1 = not in the vocabulary), "closed": () bool, "index": () long}``.

    Questions are tokenized once, here; images are decoded once per file, lazily.
    """

    def __init__(
        self, records: Sequence[VQARecord], vocab: AnswerVocab, tokenize: Tokenize, img_size: int, in_chans: int
    ) -> None:
        check_images(records)
        self.records = list(records)
        self.vocab = vocab
        self.img_size = img_size
        self.in_chans = in_chans
        self.question_ids, self.question_mask = tokenize([r.question for r in self.records])
        self.answers = torch.tensor([vocab.encode(r.answer) for r in self.records], dtype=torch.long)
        self.closed = torch.tensor([r.answer_type == CLOSED for r in self.records])
        self._images: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> torch.Tensor:
        record = self.records[index]
        array = self._images.get(record.image)
        if array is None:
            array = self._images[record.image] = load_image(record.image, self.img_size, self.in_chans, record.source)
        return torch.from_numpy(zscore_nonzero(array))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.image(index),
            "question_ids": self.question_ids[index],
            "question_mask": self.question_mask[index],
            "answer": self.answers[index],
            "closed": self.closed[index],
            "index": torch.tensor(index),
        }
