"""Check a dataset before training, in the spirit of nnU-Net's dataset integrity check.

:func:`check_dataset` reports every problem it finds (not only the first), each naming
the case and the file: missing files, unreadable NIfTI, shapes that disagree between
modalities and label, modalities on different voxel grids (affines), NaN/Inf voxels,
label values outside the declared set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medtune.data.cases import Case, detect_layout, scan_cases
from medtune.data.labels import LabelSpec
from medtune.data.volume import check_finite, open_nifti, read_array, read_label
from medtune.errors import DataError

log = logging.getLogger(__name__)

AFFINE_TOLERANCE = 1e-3  # mm; modalities of one case must share the voxel grid


def default_label_spec(root: str | Path, layout: str) -> LabelSpec:
    """BraTS values (0, 1, 2, 4) for BraTS folders; ``labels`` of ``dataset.json`` otherwise."""
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout in ("msd", "nnunet") and (root / "dataset.json").is_file():
        return LabelSpec.from_dataset_json(root / "dataset.json")
    return LabelSpec.brats()


def _check_case(case: Case, spec: LabelSpec) -> list[str]:
    problems: list[str] = []
    shapes: dict[Path, tuple[int, ...]] = {}
    first_affine: tuple[Path, np.ndarray] | None = None
    for path in case.images:
        try:
            img = open_nifti(path, case.case_id)
            data = read_array(img, path, case.case_id)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if first_affine is None:
            first_affine = (path, np.asarray(img.affine))
        elif not np.allclose(img.affine, first_affine[1], atol=AFFINE_TOLERANCE):
            problems.append(
                f"case {case.case_id}: {path} has another voxel-to-world affine than {first_affine[0].name}"
            )
        if case.channels is not None:
            if data.ndim != 4:
                problems.append(f"case {case.case_id}: expected a 4D image in {path}, got shape {data.shape}")
                continue
            if max(case.channels) >= data.shape[3]:
                problems.append(f"case {case.case_id}: {path} has {data.shape[3]} channels, fewer than declared")
            data = data[..., list(case.channels)]
            shapes[path] = data.shape[:3]
        else:
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                problems.append(f"case {case.case_id}: {path} is not a 3D volume (shape {data.shape})")
                continue
            shapes[path] = data.shape
        try:
            check_finite(data, path, case.case_id)
        except DataError as exc:
            problems.append(str(exc))
    if case.label is not None:
        try:
            label, _ = read_label(case.label, case.case_id)
            shapes[case.label] = label.shape
            bad = spec.invalid_values(label)
            if bad:
                problems.append(
                    f"case {case.case_id}: label {case.label} has values {bad} "
                    f"outside the declared set {list(spec.values)}"
                )
        except DataError as exc:
            problems.append(str(exc))
    if len(set(shapes.values())) > 1:
        first_path, first_shape = next(iter(shapes.items()))
        for path, shape in shapes.items():
            if shape != first_shape:
                problems.append(
                    f"case {case.case_id}: {path} has shape {tuple(shape)}, "
                    f"{first_path.name} has {tuple(first_shape)}"
                )
    return problems


def check_dataset(
    root: str | Path,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    label_values: Sequence[int] | None = None,
    require_labels: bool = False,
) -> list[str]:
    """Every problem of the dataset at ``root``, one line each naming case and file.

    Args:
        root: dataset folder.
        layout: ``"auto"``, ``"brats"``, ``"msd"`` or ``"nnunet"``.
        modalities: as in :func:`~medtune.data.find_cases`.
        label_values: allowed label values; default BraTS (0, 1, 2, 4) or the
            ``labels`` of ``dataset.json``.
        require_labels: a case without a label is a problem.

    Returns:
        problems, empty if the dataset is fine.
    """
    try:
        cases, problems = scan_cases(root, layout, modalities, require_labels)
        spec = LabelSpec.from_values(label_values) if label_values else default_label_spec(root, layout)
    except DataError as exc:
        return [str(exc)]
    for case in cases:
        problems.extend(_check_case(case, spec))
    log.debug("checked %d cases in %s: %d problems", len(cases), root, len(problems))
    return problems


def count_cases(root: str | Path, layout: str = "auto", modalities: Sequence[str] | None = None) -> int:
    cases, _ = scan_cases(root, layout, modalities)
    return len(cases)

