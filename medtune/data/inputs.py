"""What prediction and evaluation read: cases of any input folder, and labels alone.

``medtune predict --input`` takes a dataset folder (any layout of :mod:`.cases`), one
case folder, an MSD/nnU-Net ``imagesTs/`` folder, a plain folder of images, or (with
``--subset test``) the ``test`` list of an MSD ``dataset.json``; :func:`input_cases`
turns each into :class:`~medtune.data.cases.Case` objects. ``medtune evaluate`` needs
only the ground-truth label files: :func:`label_files` lists them without asking for
the images (an nnU-Net ``labelsTr/`` is scored without its ``imagesTr/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medtune.data.cases import (
    _CHANNEL_FILE,
    Case,
    _brats_case_folders,
    _channel_names,
    _find_brats_file,
    _read_dataset_json,
    _scan_nnunet,
    _select_channels,
    detect_layout,
    find_cases,
    inside_root,
    is_channel_file_folder,
    is_nifti,
    nifti_stem,
)
from medtune.errors import DataError

SUBSETS = ("training", "test")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and is_nifti(f) and not f.name.startswith("."))


def _msd_channels(root: Path, modalities: Sequence[str] | None) -> tuple[int, ...] | None:
    """The image-file channels to read for ``modalities`` (the ``modality`` map of
    ``root/dataset.json``; a single-modality task reads its 3D files as channel 0)."""
    where = root / "dataset.json"
    names = _channel_names(_read_dataset_json(root), "modality", where)
    if names is None and modalities is not None:
        raise DataError(f"{where}: no 'modality' map to select {list(modalities)} from")
    return _select_channels(names, modalities, where) if names is not None else None


def find_msd_image_cases(images_dir: str | Path, modalities: Sequence[str] | None = None) -> list[Case]:
    """Unlabeled cases from a folder of MSD images (``imagesTs/``, 3D or 4D): one case per
    file, channels named by the ``modality`` map of the ``dataset.json`` beside the folder."""
    images_dir = Path(images_dir)
    channels = _msd_channels(images_dir.parent, modalities)
    files = _nifti_files(images_dir)
    if not files:
        raise DataError(f"{images_dir}: no NIfTI images")
    return [Case(nifti_stem(f), [f], None, channels) for f in files]


def find_image_file_cases(images_dir: str | Path) -> list[Case]:
    """Unlabeled cases from a plain folder of images, one case per file, named by the file
    (a symbolic link by its own name): a 3D file is a one-channel case, a 4D file a case
    with its channels in order."""
    import nibabel as nib

    images_dir = Path(images_dir)
    files = _nifti_files(images_dir)
    if not files:
        raise DataError(f"{images_dir}: no NIfTI images")
    cases = []
    for path in files:
        try:
            shape = nib.load(str(path)).shape
        except Exception as exc:  # noqa: BLE001 - nibabel raises several kinds; reported by name
            raise DataError(f"case {nifti_stem(path)}: cannot read NIfTI {path} ({exc})") from None
        channels = tuple(range(shape[3])) if len(shape) == 4 and shape[3] > 1 else None
        cases.append(Case(nifti_stem(path), [path], None, channels))
    return cases


def find_channel_file_cases(images_dir: str | Path, modalities: Sequence[str] | None = None) -> list[Case]:
    """Unlabeled cases from a folder of nnU-Net channel files (``imagesTs/``, say); the
    channel names come from the ``dataset.json`` beside the folder, when there is one."""
    images_dir = Path(images_dir)
    problems: list[str] = []
    cases = _scan_nnunet(images_dir.parent, modalities, problems, images_dir=images_dir)
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return [Case(c.case_id, c.images, None, c.channels) for c in cases]


def test_list_cases(root: str | Path, modalities: Sequence[str] | None = None) -> list[Case]:
    """The unlabeled cases that ``dataset.json``'s ``test`` list names (MSD: paths of
    ``imagesTs/`` files; nnU-Net v1 lists ``imagesTs/<case>.nii.gz`` for the channel
    files ``imagesTs/<case>_0000.nii.gz``)."""
    root = Path(root)
    where = root / "dataset.json"
    if not where.is_file():
        raise DataError(f"{root}: no dataset.json, so no 'test' list (give the images folder as --input instead)")
    listed = _read_dataset_json(root).get("test")
    if not isinstance(listed, list) or not listed:
        raise DataError(f"{where}: no 'test' list of images")
    names = [entry.get("image") if isinstance(entry, dict) else entry for entry in listed]
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise DataError(f"{where}: 'test' entries must be image paths, got {bad[0]!r}")
    paths = [inside_root(root, name, where) for name in names]
    if all(p.is_file() for p in paths):
        channels = _msd_channels(root, modalities)
        return [Case(nifti_stem(p), [p], None, channels) for p in paths]
    folders = {p.parent for p in paths}
    if len(folders) == 1 and next(iter(folders)).is_dir() and is_channel_file_folder(next(iter(folders))):
        wanted = {nifti_stem(p) for p in paths}
        cases = [c for c in find_channel_file_cases(next(iter(folders)), modalities) if c.case_id in wanted]
        missing = sorted(wanted - {c.case_id for c in cases})
        if missing:
            raise DataError(f"{where}: test cases without image files: {', '.join(missing)}")
        return cases
    missing = [str(p) for p in paths if not p.is_file()]
    raise DataError(f"{where}: test image file missing: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def input_cases(path: str | Path, layout: str = "auto", modalities: Sequence[str] | None = None,
                subset: str = "training") -> list[Case]:
    """The cases to predict for ``--input path``: a dataset folder (its training cases, or
    with ``subset="test"`` its ``dataset.json`` test list), one case folder, an MSD or
    nnU-Net ``imagesTs/``-style folder, or a plain folder of images."""
    path = Path(path)
    if subset not in SUBSETS:
        raise DataError(f"unknown subset '{subset}' (known: {', '.join(SUBSETS)})")
    if path.is_file():
        raise DataError(f"--input {path} is a file: give its case folder (or a dataset folder)")
    if not path.is_dir():
        raise DataError(f"input folder not found: {path}")
    if subset == "test":
        return test_list_cases(path, modalities)
    if is_channel_file_folder(path):  # nnU-Net imagesTs/: <case>_0000.nii.gz, ...
        return find_channel_file_cases(path, modalities)
    if (path.parent / "dataset.json").is_file() and detect_layout(path.parent) == "msd":
        return find_msd_image_cases(path, modalities)  # MSD imagesTs/: one 3D or 4D file per case
    if _nifti_files(path) and not (path / "dataset.json").is_file():
        if _brats_case_folders(path) == [path]:  # one BraTS case folder, whatever the run's layout
            return find_cases(path, "brats", modalities)
        return find_image_file_cases(path)  # a plain folder of images, one case per file
    return find_cases(path, layout, modalities)


def label_files(root: str | Path, layout: str = "auto") -> list[tuple[str, Path]]:
    """``(case id, label file)`` of every labeled case of a dataset, sorted; the images are
    not looked for (evaluation needs none). BraTS: the ``*seg*`` file of each case folder
    (or of ``root`` itself); MSD: the ``label`` of each ``training`` entry; nnU-Net:
    ``labelsTr/<case>.nii.gz`` (or ``root`` itself when it is such a folder of labels)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ground-truth folder not found: {root}")
    layout = detect_layout(root) if layout == "auto" else layout
    found: list[tuple[str, Path]] = []
    if layout == "brats":
        for folder in _brats_case_folders(root):
            files = _nifti_files(folder)
            seg = [f for f in files if "seg" in f.name.lower()]
            if len(seg) > 1:
                seg = _find_brats_file(folder, seg, "seg")
            if len(seg) > 1:
                raise DataError(f"case {folder.name}: several label files in {folder}: {', '.join(f.name for f in seg)}")
            if seg:
                found.append((folder.name, seg[0]))
    elif layout == "msd":
        where = root / "dataset.json"
        training = _read_dataset_json(root).get("training")
        if not isinstance(training, list):
            raise DataError(f"{where}: 'training' must be a list of {{image, label}} entries")
        for entry in training:
            if isinstance(entry, dict) and entry.get("label"):
                label = inside_root(root, entry["label"], where)
                image = entry.get("image")
                case_id = nifti_stem(Path(image)) if isinstance(image, str) else nifti_stem(label)
                found.append((case_id, label))
    else:
        labels_dir = root / "labelsTr" if (root / "labelsTr").is_dir() else root
        ending = str(_read_dataset_json(root).get("file_ending", ".nii.gz")) if (root / "dataset.json").is_file() else None
        for path in _nifti_files(labels_dir):
            if ending is None or path.name.endswith(ending):
                if _CHANNEL_FILE.match(nifti_stem(path)) and labels_dir == root:
                    continue  # an images folder given by mistake: its channel files are no labels
                found.append((nifti_stem(path), path))
    if not found:
        raise DataError(f"no label files found in {root} (layout {layout})")
    return sorted(found)


__all__ = [
    "SUBSETS", "find_channel_file_cases", "find_image_file_cases", "find_msd_image_cases", "input_cases",
    "label_files", "test_list_cases",
]
