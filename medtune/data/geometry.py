"""Voxel geometry: orientation, spacing, and the way between a file's grid and the training grid.

A scanner writes volumes in any orientation (BraTS: LPS-like, many CT exports: LPS,
others PSR ...) and at any voxel spacing (an MSD CT task: 0.7 x 0.7 x 5 mm). Before a
case is cached or predicted it is brought to one *training grid*, with MONAI's
transforms (as a MONAI pipeline would)::

    file grid  --Orientation(axcodes)-->  reoriented grid  --Spacing(target)-->  training grid
               <--Orientation(back)----                  <--SpatialResample---

- The axes are reoriented so that the array runs along :func:`canonical_axcodes` of the
  slice axis: ``RAS`` for axial slices (the last array axis then runs inferior ->
  superior, and a slice along it is an axial slice), ``RSA`` for coronal, ``ASR`` for
  sagittal ones. Reorientation only permutes and flips axes: it is exact both ways.
- The reoriented volume is resampled to the target spacing (``data.spacing``: the
  dataset's median spacing planned as nnU-Net does, :func:`plan_spacing`, or explicit
  mm), linearly for images and by nearest neighbour for labels. A case already at the
  target spacing (within 0.1 % on every axis) is not resampled, so its way back is exact.
- Prediction maps back (:func:`to_input_grid`): resampled onto the reoriented grid of
  the input (linear for probabilities, nearest for labels), then reoriented back to the
  input's own axes, so the written file has the input's shape and affine exactly.

Only :func:`to_training_grid` and :func:`to_input_grid` import torch/MONAI; the rest
(what ``medtune data check`` uses) needs nibabel alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from nibabel import orientations

SLICE_AXES: dict[str, str] = {"axial": "RAS", "coronal": "RSA", "sagittal": "ASR"}
"""Slice axis name -> the axis codes of the training grid (the slice axis last)."""

_AXIS_OF_INDEX = {0: "sagittal", 1: "coronal", 2: "axial", -1: "axial", -2: "coronal", -3: "sagittal"}
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # world axis letters, the NIfTI (RAS+) convention
SPACING_TOLERANCE = 1e-3  # relative: a case this close to the target spacing is not resampled


def slice_axis_name(value: str | int) -> str:
    """``"axial"`` / ``"coronal"`` / ``"sagittal"``; an int is an axis of the RAS array
    (0 sagittal, 1 coronal, 2 or -1 axial)."""
    if isinstance(value, bool):
        raise ValueError(f"slice axis must be axial, coronal, sagittal or an axis 0..2, got {value!r}")
    if isinstance(value, int):
        if value not in _AXIS_OF_INDEX:
            raise ValueError(f"slice axis must be an axis in -3..2, got {value}")
        return _AXIS_OF_INDEX[value]
    name = str(value).lower()
    if name not in SLICE_AXES:
        raise ValueError(f"slice axis must be one of {', '.join(SLICE_AXES)} (or an axis 0..2), got {value!r}")
    return name


def canonical_axcodes(slice_axis: str | int = "axial") -> str:
    """Axis codes of the training grid: the slice axis last (``RAS`` for axial)."""
    return SLICE_AXES[slice_axis_name(slice_axis)]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def axcodes_of(affine: np.ndarray) -> str:
    """The affine's orientation, e.g. ``"LPS"`` (the world direction each array axis points to)."""
    return "".join(orientations.aff2axcodes(np.asarray(affine, dtype=np.float64), labels=_LABELS))


def affine_problem(affine: np.ndarray) -> str | None:
    """Why a voxel-to-world affine cannot place a volume (None when it can): non-finite
    entries, a zero or NaN voxel spacing, a matrix that is not invertible."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "its voxel-to-world affine has NaN/Inf entries"
    spacing = voxel_spacing(affine)
    if min(spacing) <= 1e-6:
        return f"its voxel spacing {format_spacing(spacing)} has a zero axis"
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-9 * float(np.prod(spacing)):
        return "its voxel-to-world affine is not invertible (axes are parallel)"
    return None


def format_spacing(spacing: Sequence[float]) -> str:
    return " x ".join(f"{s:.3g}" for s in spacing) + " mm"


@dataclass(frozen=True)
class Grid:
    """A voxel grid: array shape and voxel-to-world affine (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def axcodes(self) -> str:
        return axcodes_of(self.affine)

    def to_json(self) -> dict[str, Any]:
        return {"shape": [int(n) for n in self.shape], "affine": np.asarray(self.affine, dtype=np.float64).tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Grid":
        return cls(tuple(int(n) for n in data["shape"]), np.asarray(data["affine"], dtype=np.float64))

    def reoriented(self, axcodes: str) -> "Grid":
        """This grid with its axes permuted and flipped to ``axcodes`` (no data moved;
        the same affine as MONAI's ``Orientation`` gives)."""
        transform = orientations.ornt_transform(
            orientations.io_orientation(self.affine), orientations.axcodes2ornt(axcodes, labels=_LABELS)
        )
        affine = self.affine @ orientations.inv_ornt_aff(transform, self.shape)
        shape = [0, 0, 0]
        for axis, (new_axis, _) in enumerate(transform):
            shape[int(new_axis)] = self.shape[axis]
        return Grid(tuple(shape), affine)


@dataclass(frozen=True)
class CaseGrid:
    """How one case went from its file's grid to the training grid (what prediction
    needs to map back): the ``file`` grid, the ``reoriented`` one, the ``target`` one."""

    file: Grid
    reoriented: Grid
    target: Grid

    @property
    def resampled(self) -> bool:
        return self.target.shape != self.reoriented.shape or not np.allclose(
            self.target.affine, self.reoriented.affine, atol=1e-6
        )

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file.to_json(), "reoriented": self.reoriented.to_json(), "target": self.target.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CaseGrid":
        return cls(Grid.from_json(data["file"]), Grid.from_json(data["reoriented"]), Grid.from_json(data["target"]))


def needs_resampling(spacing: Sequence[float], target: Sequence[float] | None) -> bool:
    """Whether a volume of ``spacing`` must be resampled to ``target`` (None: never)."""
    if target is None:
        return False
    return any(abs(s - t) > SPACING_TOLERANCE * t for s, t in zip(spacing, target))


def plan_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """The target spacing of a dataset, planned as nnU-Net plans its full-resolution one.

    Each axis gets the median spacing of the cases. One exception, for strongly
    anisotropic data (thick-slice CT): when the coarsest axis of that median is more than
    3x coarser than every other axis *and* has fewer than a third of the voxels of the
    smallest other axis, resampling it to the median would throw away the thin-slice
    cases' detail; it gets the 10th percentile of its spacings instead, but never finer
    than the coarsest other axis (a hair above it).

    Args:
        spacings: ``(N, 3)`` spacings in mm, in the training grid's axis order.
        shapes: ``(N, 3)`` voxel counts, same order.
    Returns:
        three spacings in mm.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or len(spacings) == 0:
        raise ValueError(f"plan_spacing needs (N, 3) spacings, got shape {spacings.shape}")
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    coarsest = int(np.argmax(target))
    others = [a for a in range(3) if a != coarsest]
    coarse_spacing = target[coarsest] > 3 * target[others].max()
    few_voxels = median_shape[coarsest] * 3 < median_shape[others].min()
    if coarse_spacing and few_voxels:
        chosen = float(np.percentile(spacings[:, coarsest], 10))
        if chosen < target[others].max():
            chosen = float(target[others].max()) + 1e-5
        target[coarsest] = chosen
    return [round(float(s), 5) for s in target]


def spacing_outliers(
    spacings: dict[str, Sequence[float]], reference: Sequence[float], factor: float = 3.0
) -> list[str]:
    """Case ids whose spacing differs from ``reference`` by more than ``factor`` on any axis
    (either way)."""
    flagged = []
    for case_id, spacing in spacings.items():
        ratios = [s / r for s, r in zip(spacing, reference) if r > 0]
        if any(not math.isfinite(q) or q > factor or q < 1 / factor for q in ratios):
            flagged.append(case_id)
    return flagged


# --------------------------------------------------------------------------- moving voxels (MONAI)


def _meta_tensor(array: np.ndarray, affine: np.ndarray):
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array)), affine=torch.as_tensor(affine, dtype=torch.float64))


def _reorient(tensor, axcodes: str):
    from monai.transforms import Orientation

    return Orientation(axcodes=axcodes, labels=_LABELS)(tensor)


def to_training_grid(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    axcodes: str = "RAS",
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, CaseGrid]:
    """Bring a case to the training grid: reorient, then resample to ``spacing``.

    Args:
        image: ``(M, *S)`` float32 on the file's grid.
        label: ``(*S)`` uint8 label values, or None.
        affine: the file's voxel-to-world matrix.
        axcodes: orientation of the training grid (:func:`canonical_axcodes`).
        spacing: target spacing in mm (training-grid axis order), or None to keep the
            reoriented voxels as they are.
    Returns:
        ``(image (M, *S'), label (*S') | None, grid)``: float32 image (linear), uint8
        label (nearest), and the :class:`CaseGrid` to map predictions back with.
    """
    file_grid = Grid(tuple(int(n) for n in image.shape[1:]), np.asarray(affine, dtype=np.float64))
    reoriented = file_grid.reoriented(axcodes)
    if reoriented.shape == file_grid.shape and np.allclose(reoriented.affine, file_grid.affine):
        out_image, out_label = image, label  # already in the training orientation: no copy
    else:
        out_image = np.asarray(_reorient(_meta_tensor(image, affine), axcodes).numpy())
        out_label = None if label is None else np.asarray(_reorient(_meta_tensor(label[None], affine), axcodes)[0].numpy())
    if not needs_resampling(reoriented.spacing, spacing):
        return out_image, out_label, CaseGrid(file_grid, reoriented, reoriented)
    from monai.transforms import Spacing

    moved = Spacing(pixdim=tuple(spacing), mode="bilinear", padding_mode="border", dtype=np.float32)(
        _meta_tensor(out_image.astype(np.float32, copy=False), reoriented.affine)
    )
    target = Grid(tuple(int(n) for n in moved.shape[1:]), np.asarray(moved.affine.numpy(), dtype=np.float64))
    resampled_label = None
    if out_label is not None:
        nearest = Spacing(pixdim=tuple(spacing), mode="nearest", padding_mode="border", dtype=np.float32)(
            _meta_tensor(out_label[None].astype(np.float32), reoriented.affine)
        )
        resampled_label = np.rint(nearest[0].numpy()).astype(np.uint8)
    return np.asarray(moved.numpy(), dtype=np.float32), resampled_label, CaseGrid(file_grid, reoriented, target)


def to_input_grid(array: Any, grid: CaseGrid, mode: str = "bilinear") -> np.ndarray:
    """Map ``array (K, *S')`` on the training grid back onto the file's grid ``(K, *S)``.

    ``mode``: ``"bilinear"`` for probabilities, ``"nearest"`` for label maps. Where the
    training grid only reoriented the file (no resampling), the result is exact.
    """
    import torch

    tensor = torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array)
    dtype = tensor.dtype
    if grid.resampled:
        from monai.transforms import SpatialResample

        moved = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
            _meta_tensor(tensor.float().numpy(), grid.target.affine),
            dst_affine=torch.as_tensor(grid.reoriented.affine, dtype=torch.float64),
            spatial_size=grid.reoriented.shape,
        )
        tensor = moved.as_tensor()
        if mode == "nearest" and not dtype.is_floating_point:
            tensor = torch.round(tensor).to(dtype)
    if grid.reoriented.shape == grid.file.shape and np.allclose(grid.reoriented.affine, grid.file.affine):
        return tensor.numpy()
    back = _reorient(_meta_tensor(tensor.numpy(), grid.reoriented.affine), grid.file.axcodes)
    if tuple(back.shape[1:]) != tuple(grid.file.shape) or not np.allclose(back.affine.numpy(), grid.file.affine, atol=1e-4):
        raise ValueError(f"mapping back to the input grid gave shape {tuple(back.shape[1:])}, expected {grid.file.shape}")
    return back.as_tensor().numpy()


__all__ = [
    "CaseGrid", "Grid", "SLICE_AXES", "affine_problem", "axcodes_of", "canonical_axcodes", "format_spacing",
    "needs_resampling", "plan_spacing", "slice_axis_name", "spacing_outliers", "to_input_grid", "to_training_grid",
    "voxel_spacing",
]
