"""Check a dataset before training, in the spirit of nnU-Net's dataset integrity check.

:func:`check_dataset` reports every problem it finds (not only the first), each naming
the case and the file: missing files, unreadable NIfTI, shapes that disagree between
modalities and label, modalities on different voxel grids (affines), NaN/Inf voxels,
label values outside the declared set. Each case is read by
:func:`medtune.data.volume.read_case`, the reader training and prediction use too, so
what ``data check`` refuses, training refuses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence


from medtune.data.cases import detect_layout, scan_cases
from medtune.data.labels import LabelSpec
from medtune.data.volume import read_case
from medtune.errors import DataError

log = logging.getLogger(__name__)


def default_label_spec(root: str | Path, layout: str) -> LabelSpec:
    """BraTS values (0, 1, 2, 4) for BraTS folders; ``labels`` of ``dataset.json`` otherwise."""
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout in ("msd", "nnunet") and (root / "dataset.json").is_file():
        return LabelSpec.from_dataset_json(root / "dataset.json")
    return LabelSpec.brats()


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
        problems.extend(read_case(case, with_label=True, label_spec=spec)[1])
    log.debug("checked %d cases in %s: %d problems", len(cases), root, len(problems))
    return problems


def count_cases(root: str | Path, layout: str = "auto", modalities: Sequence[str] | None = None) -> int:
    cases, _ = scan_cases(root, layout, modalities)
    return len(cases)

