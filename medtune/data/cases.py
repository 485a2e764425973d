"""Find the cases of a dataset on disk: BraTS folders, MSD ``dataset.json``, nnU-Net raw.

A :class:`Case` only names files; nothing is read here except ``dataset.json``. Three
layouts are understood:

- ``brats``: one folder per case, ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]``
  (BraTS 2020/2021), optionally nested one level under group folders such as
  ``HGG/`` and ``LGG/`` (BraTS 2019); BraTS 2023 names (``<case>-{t2f,t1c,t1n,t2w,seg}``)
  are found through the modality aliases. Any single ``*seg*.nii*`` file is accepted as the
  label, which covers BraTS20_Training_355 whose label file has another name.
- ``msd``: Medical Segmentation Decathlon, ``dataset.json`` with
  ``training: [{image, label}]`` and a ``modality`` map; one image per case, 3D for a
  single-modality task (Heart, Liver, Hippocampus, ... CT and MRI) or 4D with the
  modalities on the last axis (BrainTumour, Prostate).
- ``nnunet``: nnU-Net raw, ``imagesTr/<case>_0000.nii.gz`` (one file per channel) and
  ``labelsTr/<case>.nii.gz``, described by ``dataset.json`` (``channel_names``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medtune.errors import DataError

BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1ce", "t1", "t2")
"""Modality order used by the group's code (DESIGN section 3)."""

LAYOUTS: tuple[str, ...] = ("auto", "brats", "msd", "nnunet")

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

# Names the same MRI contrast goes by in BraTS file names and MSD/nnU-Net json files.
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2flair", "t2-flair", "t2_flair", "t2f"),
    "t1ce": ("t1ce", "t1gd", "t1c", "t1-ce", "t1_ce", "t1contrast"),
    "t1": ("t1", "t1w", "t1n"),
    "t2": ("t2", "t2w"),
}


@dataclass
class Case:
    """One case of a dataset: where its image and label files are.

    Attributes:
        case_id: the case's name (BraTS folder name, MSD/nnU-Net file stem).
        images: image files in modality order; one file per modality, except for MSD
            where a single 4D file holds all modalities on its last axis.
        label: the label map file, or None for an unlabeled case.
        channels: for a single 4D image file (MSD), the indices on its last axis to
            read, in modality order; None when each file holds one modality.
    """

    case_id: str
    images: list[Path]
    label: Path | None = None
    channels: tuple[int, ...] | None = None

    @property
    def num_modalities(self) -> int:
        return len(self.channels) if self.channels is not None else len(self.images)

    @property
    def files(self) -> list[Path]:
        """Every file of the case (images, then the label if any)."""
        return list(self.images) + ([self.label] if self.label is not None else [])


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """``BraTS20_Training_001_t1.nii.gz`` -> ``BraTS20_Training_001_t1``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root``: ``nnunet``, ``msd`` or ``brats``.

    A ``dataset.json`` with ``channel_names`` is nnU-Net v2's. One with a ``training``
    list is an MSD task, unless its images are not where it says and ``imagesTr/`` holds
    nnU-Net channel files (``<case>_0000.nii.gz``: nnU-Net v1 converted tasks list
    ``imagesTr/la_003.nii.gz`` for ``imagesTr/la_003_0000.nii.gz``). No ``dataset.json``:
    nnU-Net when there is an ``imagesTr/``, else BraTS folders.
    """
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        meta = _read_dataset_json(root)
        if "channel_names" in meta:
            return "nnunet"
        training = meta.get("training")
        if isinstance(training, list) and training and isinstance(training[0], dict):
            listed = [e.get("image") for e in training[:8] if isinstance(e, dict) and isinstance(e.get("image"), str)]
            if any((root / name).is_file() for name in listed):
                return "msd"
            images = root / "imagesTr"
            return "nnunet" if images.is_dir() and is_channel_file_folder(images) else "msd"
        return "nnunet"
    if (root / "imagesTr").is_dir():
        return "nnunet"
    return "brats"


def is_channel_file_folder(folder: Path) -> bool:
    """True for a folder of nnU-Net channel files ``<case>_0000.nii.gz`` (e.g. imagesTs/);
    hidden files (the ``._*`` files of macOS archives such as the MSD downloads) aside."""
    stems = [nifti_stem(p) for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")]
    return bool(stems) and all(_CHANNEL_FILE.match(stem) for stem in stems)


def canonical_modality(name: str) -> str:
    """``"T1w"`` -> ``"t1"``, ``"FLAIR"`` -> ``"flair"``; names outside the alias table
    (``"CT"``) are returned unchanged."""
    normalised = _normalise_name(name)
    for canonical, aliases in MODALITY_ALIASES.items():
        if normalised in {_normalise_name(a) for a in (canonical, *aliases)}:
            return canonical
    return name


def resolve_modalities(
    root: str | Path, layout: str = "auto", modalities: Sequence[str] | None = None
) -> list[str]:
    """The modality names, in channel order, that ``find_cases(root, layout, modalities)``
    reads: ``modalities`` itself when given, else BraTS's default order or the channel
    names of dataset.json, in canonical form where one is known.

    A run records these so that prediction on a dataset of another layout (a BraTS-trained
    model on an MSD folder, say) reads the same modalities in the same order.
    """
    if modalities is not None:
        return [str(m) for m in modalities]
    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "brats":
        return list(BRATS_MODALITIES)
    meta = _read_dataset_json(root) if (root / "dataset.json").is_file() else {}
    where = root / "dataset.json"
    names = _channel_names(meta, "channel_names", where) or _channel_names(meta, "modality", where)
    if not names:
        raise DataError(f"{where}: no 'modality' or 'channel_names' map to name the channels")
    return [canonical_modality(n) for n in names]


def find_cases(
    root: str | Path,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    require_labels: bool = False,
) -> list[Case]:
    """List the cases under ``root``, sorted by case id.

    Args:
        root: dataset folder.
        layout: ``"auto"`` (detect), ``"brats"``, ``"msd"`` or ``"nnunet"``.
        modalities: modality names in the order wanted. None means
            ``("flair", "t1ce", "t1", "t2")`` for BraTS and every channel of
            ``dataset.json`` in its order for MSD/nnU-Net. Names are matched without
            case and with common aliases (``t1ce`` = ``t1gd``, ``t1`` = ``T1w``, ...).
        require_labels: a case without a label file is an error.

    Raises:
        DataError: missing or empty folder, missing modality or label file (the
            message names the case and the file).
    """
    cases, problems = scan_cases(root, layout, modalities, require_labels)
    if problems:
        raise DataError(problems[0])
    return cases


def scan_cases(
    root: str | Path,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    require_labels: bool = False,
) -> tuple[list[Case], list[str]]:
    """Like :func:`find_cases`, but returns every problem instead of raising the first.

    Cases with a problem are left out of the returned list. A problem that makes the
    whole dataset unreadable (missing root, bad ``dataset.json``) is still raised.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown dataset layout '{layout}' (known: {', '.join(LAYOUTS)})")
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")
    if not any(root.iterdir()):
        raise DataError(f"dataset folder is empty: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    problems: list[str] = []
    if layout == "brats":
        cases = _scan_brats(root, tuple(modalities or BRATS_MODALITIES), problems)
    elif layout == "msd":
        cases = _scan_msd(root, modalities, problems)
    else:
        cases = _scan_nnunet(root, modalities, problems)
    if require_labels:
        for case in cases:
            if case.label is None:
                problems.append(f"case {case.case_id}: no label file ({_where(case)})")
        cases = [c for c in cases if c.label is not None]
    if not cases and not problems:
        problems.append(f"no cases found in {root} (layout {layout})")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        problems.append(f"case ids appear twice in {root}: {', '.join(dupes)}")
    return sorted(cases, key=lambda c: c.case_id), problems


def _where(case: Case) -> str:
    return str(case.images[0].parent) if case.images else case.case_id


# --------------------------------------------------------------------------- BraTS


def _brats_case_folders(root: Path) -> list[Path]:
    """Case folders directly under ``root``, or one level down under group folders;
    ``root`` itself when it is one case folder (it holds ``<root name>_*.nii.gz`` files).

    A folder that holds NIfTI files, or holds nothing at all, is a case; a folder that
    holds only sub-folders (``HGG/``, ``LGG/``) is a group and is descended into.
    """
    own = [p for p in root.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")]
    if own and all(nifti_stem(p).startswith(f"{root.name}_") or nifti_stem(p).startswith(f"{root.name}-") for p in own):
        return [root]
    folders: list[Path] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        children = list(entry.iterdir())
        has_nifti = any(c.is_file() and is_nifti(c) for c in children)
        subdirs = [c for c in children if c.is_dir() and not c.name.startswith(".")]
        if not has_nifti and subdirs:
            folders.extend(sorted(subdirs))
        else:
            folders.append(entry)
    return folders


def _find_brats_file(folder: Path, files: list[Path], suffix: str) -> list[Path]:
    """Files named ``<folder>_<suffix>.nii[.gz]``, else any ``*_<name>`` or ``*-<name>``
    file for ``suffix`` or one of its aliases (BraTS 2023: ``-t2f``, ``-t1c``, ``-t1n``,
    ``-t2w``)."""
    exact = [f for f in files if nifti_stem(f) == f"{folder.name}_{suffix}"]
    if exact:
        return exact
    names = {suffix.lower(), *MODALITY_ALIASES.get(suffix.lower(), ())}
    endings = tuple(sep + name for name in names for sep in "_-")
    return [f for f in files if nifti_stem(f).lower().endswith(endings)]


def _scan_brats(root: Path, modalities: tuple[str, ...], problems: list[str]) -> list[Case]:
    folders = _brats_case_folders(root)
    if not folders:
        problems.append(f"no case folders in {root} (expected <case>/<case>_flair.nii.gz, ...)")
        return []
    cases = []
    for folder in folders:
        case_id = folder.name
        files = sorted(f for f in folder.iterdir() if f.is_file() and is_nifti(f) and not f.name.startswith("."))
        if not files:
            problems.append(f"case {case_id}: folder {folder} holds no NIfTI files")
            continue
        images: list[Path] = []
        ok = True
        for modality in modalities:
            found = _find_brats_file(folder, files, modality)
            if len(found) != 1:
                expected = folder / f"{case_id}_{modality}.nii.gz"
                what = "missing" if not found else f"ambiguous ({', '.join(f.name for f in found)})"
                problems.append(f"case {case_id}: modality file {what}: {expected}")
                ok = False
                continue
            images.append(found[0])
        label_files = [f for f in files if "seg" in f.name.lower() and f not in images]
        if len(label_files) > 1:
            exact = _find_brats_file(folder, label_files, "seg")
            if len(exact) == 1:
                label_files = exact
            else:
                names = ", ".join(f.name for f in label_files)
                problems.append(f"case {case_id}: several label files in {folder}: {names}")
                ok = False
        if ok:
            cases.append(Case(case_id, images, label_files[0] if label_files else None))
    return cases


# --------------------------------------------------------------------------- MSD / nnU-Net


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read dataset.json ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: top level must be a mapping")
    return meta


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _select_channels(
    channel_names: list[str], modalities: Sequence[str] | None, where: Path
) -> tuple[int, ...]:
    """Indices of ``modalities`` among ``channel_names`` (aliases allowed)."""
    if modalities is None:
        return tuple(range(len(channel_names)))
    normalised = [_normalise_name(n) for n in channel_names]
    indices = []
    for modality in modalities:
        wanted = {_normalise_name(a) for a in MODALITY_ALIASES.get(modality.lower(), ())}
        wanted.add(_normalise_name(modality))
        hits = [i for i, n in enumerate(normalised) if n in wanted]
        if len(hits) != 1:
            raise DataError(
                f"{where}: modality '{modality}' not found among channels {channel_names} "
                f"(asked for {', '.join(modalities)})"
            )
        indices.append(hits[0])
    return tuple(indices)


def _channel_names(meta: dict, key: str, where: Path) -> list[str] | None:
    mapping = meta.get(key)
    if mapping is None:
        return None
    if not isinstance(mapping, dict):
        raise DataError(f"{where}: '{key}' must map channel index to name")
    try:
        order = sorted(mapping, key=int)
    except ValueError:
        raise DataError(f"{where}: '{key}' keys must be channel indices, got {list(mapping)}") from None
    return [str(mapping[k]) for k in order]


def inside_root(root: Path, name: str, where: str | Path) -> Path:
    """``root / name``, refusing a name that leaves ``root`` (``../..``, an absolute path
    elsewhere): every reader of a listing file goes through here, so a dataset file can
    never point training at a file outside the dataset. Checked on the names as written
    (symbolic links inside the dataset may point anywhere)."""
    root = Path(os.path.abspath(root))
    path = Path(os.path.normpath(root / Path(name).expanduser()))
    if path != root and root not in path.parents:
        raise DataError(f"{where}: '{name}' lies outside the dataset folder {root}")
    return path


def _scan_msd(root: Path, modalities: Sequence[str] | None, problems: list[str]) -> list[Case]:
    where = root / "dataset.json"
    meta = _read_dataset_json(root)
    training = meta.get("training")
    if not isinstance(training, list):
        raise DataError(f"{where}: 'training' must be a list of {{image, label}} entries")
    names = _channel_names(meta, "modality", where)
    if names is None:
        if modalities is not None:
            raise DataError(f"{where}: no 'modality' map to select {list(modalities)} from")
        channels = None
    else:
        channels = _select_channels(names, modalities, where)
    cases = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append(f"{where}: training[{index}] has no 'image'")
            continue
        image = inside_root(root, entry["image"], where)
        case_id = nifti_stem(image)
        label = inside_root(root, entry["label"], where) if entry.get("label") else None
        ok = True
        for path, what in ((image, "image"), (label, "label")):
            if path is not None and not path.is_file():
                problems.append(f"case {case_id}: {what} file missing: {path}")
                ok = False
        if ok:
            cases.append(Case(case_id, [image], label, channels))
    return cases


_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _scan_nnunet(
    root: Path, modalities: Sequence[str] | None, problems: list[str], images_dir: Path | None = None
) -> list[Case]:
    where = root / "dataset.json"
    meta = _read_dataset_json(root) if where.is_file() else {}
    images_dir = root / "imagesTr" if images_dir is None else images_dir
    labels_dir = root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"nnU-Net dataset {root}: folder {images_dir.name}/ not found")
    ending = str(meta.get("file_ending", ".nii.gz"))
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if not path.name.endswith(ending) or path.name.startswith(".") or not path.is_file():
            continue
        match = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if match is None:
            problems.append(f"{path}: image name is not <case>_XXXX{ending}")
            continue
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    names = _channel_names(meta, "channel_names", where) or _channel_names(meta, "modality", where)
    num_channels = len(names) if names else max((len(c) for c in by_case.values()), default=0)
    if names is None:
        if modalities is not None:
            raise DataError(f"{where}: no 'channel_names' to select {list(modalities)} from")
        channels = tuple(range(num_channels))
    else:
        channels = _select_channels(names, modalities, where)
    cases = []
    for case_id, files in sorted(by_case.items()):
        missing = [c for c in channels if c not in files]
        if missing:
            for c in missing:
                expected = images_dir / f"{case_id}_{c:04d}{ending}"
                problems.append(f"case {case_id}: modality file missing: {expected}")
            continue
        label = labels_dir / f"{case_id}{ending}"
        cases.append(Case(case_id, [files[c] for c in channels], label if label.is_file() else None))
    return cases
