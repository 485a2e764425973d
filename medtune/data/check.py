"""Check a dataset before training, in the spirit of nnU-Net's dataset integrity check.

:func:`check_dataset` reports every problem it finds (not only the first), each naming
the case and the file: missing files, unreadable NIfTI, shapes that disagree between
modalities and label, modalities on different voxel grids (affines), NaN/Inf voxels,
label values outside the declared set. Each case is read by
:func:`medtune.data.volume.read_case`, the reader training and prediction use too, so
what ``data check`` refuses, training refuses. It also reports each case's orientation
and spacing, and flags (without refusing) cases whose spacing is more than 3x away from
the dataset's median on some axis (:func:`inspect_dataset`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medtune.data.cases import detect_layout, scan_cases
from medtune.data.geometry import Grid, format_spacing, spacing_outliers
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


@dataclass
class CaseGeometry:
    """Where one case lies: its orientation, voxel spacing (mm) and shape, along the
    file's array axes, and its spacing along the RAS axes (to compare cases stored in
    different orientations)."""

    case_id: str
    orientation: str
    spacing: tuple[float, float, float]
    shape: tuple[int, ...]
    ras_spacing: tuple[float, float, float]

    def line(self) -> str:
        return (f"case {self.case_id}: {self.orientation}, spacing {format_spacing(self.spacing)}, "
                f"shape {' x '.join(str(n) for n in self.shape)}")


@dataclass
class DatasetReport:
    """What :func:`inspect_dataset` found: every problem (refusals) and each readable case's
    geometry, with the median spacing and the cases more than 3x away from it (warnings:
    a dataset mixing orientations or spacings is handled, not refused)."""

    problems: list[str] = field(default_factory=list)
    cases: list[CaseGeometry] = field(default_factory=list)

    @property
    def median_spacing(self) -> tuple[float, float, float] | None:
        if not self.cases:
            return None
        return tuple(float(v) for v in np.median([c.ras_spacing for c in self.cases], axis=0))

    def spacing_outliers(self) -> list[str]:
        """Cases whose spacing differs from the median by more than 3x on any axis."""
        median = self.median_spacing
        if median is None:
            return []
        return spacing_outliers({c.case_id: c.ras_spacing for c in self.cases}, median)


def inspect_dataset(
    root: str | Path,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    label_values: Sequence[int] | None = None,
    require_labels: bool = False,
) -> DatasetReport:
    """Read every case of ``root`` with the reader training uses: its problems, one line
    each naming case and file, and each readable case's geometry. Arguments as in
    :func:`check_dataset`."""
    report = DatasetReport()
    try:
        cases, problems = scan_cases(root, layout, modalities, require_labels)
        spec = LabelSpec.from_values(label_values) if label_values else default_label_spec(root, layout)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.problems.extend(problems)
    for case in cases:
        volume, case_problems = read_case(case, with_label=True, label_spec=spec)
        report.problems.extend(case_problems)
        if volume is not None:
            ras = Grid(volume.spatial_shape, volume.affine).reoriented("RAS")
            report.cases.append(CaseGeometry(case.case_id, volume.orientation, tuple(volume.spacing),
                                             volume.spatial_shape, ras.spacing))
    log.debug("checked %d cases in %s: %d problems", len(cases), root, len(report.problems))
    return report


def check_dataset(
    root: str | Path,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    label_values: Sequence[int] | None = None,
    require_labels: bool = False,
) -> list[str]:
    """Every problem of the dataset at ``root``, one line each naming case and file.

    Args:
        root: dataset folder (or one BraTS case folder).
        layout: ``"auto"``, ``"brats"``, ``"msd"`` or ``"nnunet"``.
        modalities: as in :func:`~medtune.data.find_cases`.
        label_values: allowed label values; default BraTS (0, 1, 2, 4) or the
            ``labels`` of ``dataset.json``.
        require_labels: a case without a label is a problem.

    Returns:
        problems, empty if the dataset is fine.
    """
    return inspect_dataset(root, layout, modalities, label_values, require_labels).problems


def count_cases(root: str | Path, layout: str = "auto", modalities: Sequence[str] | None = None) -> int:
    cases, _ = scan_cases(root, layout, modalities)
    return len(cases)

