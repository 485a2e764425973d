"""Dataset label values, class indices and evaluation regions.

Networks predict class indices ``0..K-1``; datasets store their own values (BraTS:
0, 1, 2, 4 — BraTS 2023 renumbers enhancing tumour to 3) and are scored on nested
regions (WT, TC, ET). :class:`LabelSpec` converts between the three.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from medtune.errors import DataError

if TYPE_CHECKING:
    import torch


def _is_tensor(x: Any) -> bool:
    # torch is imported only by callers that have tensors; numpy users never load it
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(x, torch_module.Tensor)

BRATS_VALUES: tuple[int, ...] = (0, 1, 2, 4)
BRATS_NAMES: tuple[str, ...] = ("background", "necrotic/non-enhancing core", "edema", "enhancing tumour")


def brats_regions(et_value: int = 4) -> dict[str, tuple[int, ...]]:
    """WT = {1, 2, ET}, TC = {1, ET}, ET = {ET}."""
    return {"WT": (1, 2, et_value), "TC": (1, et_value), "ET": (et_value,)}


@dataclass(frozen=True)
class LabelSpec:
    """How a dataset's label values map to class indices and regions.

    Attributes:
        values: the label values in class-index order; ``values[0]`` is background.
            Class index ``k`` stands for value ``values[k]``.
        regions: region name -> label values it is made of (evaluation regions;
            for BraTS WT/TC/ET).
        names: optional class names, one per value.
    """

    values: tuple[int, ...] = BRATS_VALUES
    regions: Mapping[str, tuple[int, ...]] = field(default_factory=brats_regions)
    names: tuple[str, ...] | None = BRATS_NAMES

    def __post_init__(self) -> None:
        values = tuple(int(v) for v in self.values)
        object.__setattr__(self, "values", values)
        if len(set(values)) != len(values):
            raise ValueError(f"label values repeat: {values}")
        if any(v < 0 or v > 255 for v in values):
            raise ValueError(f"label values must lie in 0..255: {values}")
        regions = {str(k): tuple(int(v) for v in vs) for k, vs in dict(self.regions).items()}
        for name, region_values in regions.items():
            unknown = [v for v in region_values if v not in values]
            if unknown:
                raise ValueError(f"region {name} uses values {unknown} not in {values}")
        object.__setattr__(self, "regions", regions)
        if self.names is not None and len(self.names) != len(values):
            raise ValueError(f"{len(self.names)} names given for {len(values)} label values")
        # value -> class index, -1 for values outside the declared set
        index_table = np.full(256, -1, dtype=np.int64)
        index_table[list(values)] = np.arange(len(values))
        object.__setattr__(self, "_index_table", index_table)
        region_table = np.zeros((len(regions), 256), dtype=bool)
        for r, region_values in enumerate(regions.values()):
            region_table[r, list(region_values)] = True
        object.__setattr__(self, "_region_table", region_table)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def brats(cls, et_value: int = 4) -> "LabelSpec":
        """BraTS 2019-2021 (``et_value=4``) or BraTS 2023 (``et_value=3``)."""
        return cls((0, 1, 2, et_value), brats_regions(et_value), BRATS_NAMES)

    @classmethod
    def from_values(
        cls, values: Sequence[int], brats: bool = False, names: Mapping[int, str] | None = None
    ) -> "LabelSpec":
        """A spec for ``values``: one region per foreground class, named by ``names``
        (value -> name, e.g. from ``dataset.json``) or ``label<v>``. With ``brats=True``
        (BraTS data) and BraTS's values (0, 1, 2, 4 or 2023's 0, 1, 2, 3), BraTS's nested
        regions WT/TC/ET instead: they are BraTS's, not any four-class dataset's."""
        values = tuple(int(v) for v in values)
        if brats and sorted(values) in ([0, 1, 2, 4], [0, 1, 2, 3]) and values[:3] == (0, 1, 2):
            return cls.brats(et_value=values[3])
        names = {int(k): str(v) for k, v in (names or {}).items()}
        class_names = tuple(names.get(v, "background" if v == 0 else f"label{v}") for v in values)
        regions = {class_names[k]: (v,) for k, v in enumerate(values) if k > 0}
        if len(regions) != len(values) - 1:  # two classes of one name: fall back to the values
            regions = {f"label{v}": (v,) for v in values[1:]}
        return cls(values, regions, class_names if names else None)

    @classmethod
    def from_dataset_json(cls, path: str | Path) -> "LabelSpec":
        """Read ``labels`` from an MSD (``{"0": "background"}``) or nnU-Net v2
        (``{"background": 0}``, region entries as lists) ``dataset.json``."""
        path = Path(path)
        try:
            labels = json.loads(path.read_text()).get("labels")
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read dataset.json ({exc})") from None
        if not isinstance(labels, dict) or not labels:
            raise DataError(f"{path}: no 'labels' map")
        classes: dict[int, str] = {}
        regions: dict[str, tuple[int, ...]] = {}
        try:
            if all(str(k).isdigit() for k in labels):  # MSD: value -> name
                classes = {int(k): str(v) for k, v in labels.items()}
            else:  # nnU-Net v2: name -> value, or name -> [values] for a region
                for name, value in labels.items():
                    if isinstance(value, list):
                        regions[str(name)] = tuple(int(v) for v in value)
                    else:
                        classes[int(value)] = str(name)
        except (TypeError, ValueError):
            raise DataError(f"{path}: 'labels' must map values to names: {labels}") from None
        values = tuple(sorted(classes))
        if not regions:
            regions = {classes[v]: (v,) for v in values if v != 0}
        try:
            return cls(values, regions, tuple(classes[v] for v in values))
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------ conversions

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def is_brats(self) -> bool:
        """BraTS's values, names and nested regions (scored by BraTS's empty-region rules)."""
        return (self.names == BRATS_NAMES and len(self.values) == 4
                and dict(self.regions) == brats_regions(self.values[3]))

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(self.regions)

    def invalid_values(self, label: np.ndarray) -> list[int]:
        """Values present in ``label`` that are not declared (sorted)."""
        present = np.flatnonzero(np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=256))
        return [int(v) for v in present if self._index_table[v] < 0]

    def check(self, label: np.ndarray, where: str = "label") -> None:
        """Raise :class:`DataError` naming ``where`` if ``label`` has undeclared values."""
        bad = self.invalid_values(label)
        if bad:
            raise DataError(f"{where}: label values {bad} not in the declared set {list(self.values)}")

    def to_index(self, label: np.ndarray | torch.Tensor, where: str = "label") -> np.ndarray | torch.Tensor:
        """Raw values ``(*S)`` -> class indices ``(*S)`` int64 in ``0..K-1``.

        Raises:
            DataError: a value outside :attr:`values` (message names ``where``).
        """
        if _is_tensor(label):
            import torch

            table = torch.from_numpy(self._index_table).to(label.device)
            if label.dtype.is_floating_point or label.min() < 0 or label.max() > 255:
                raise DataError(f"{where}: label values must be integers in 0..255")
            index = table[label.long()]
            if (index < 0).any():
                self.check(label.cpu().numpy(), where)
            return index
        label = np.asarray(label)
        if label.dtype != np.uint8:
            if label.size and (label.min() < 0 or label.max() > 255):
                raise DataError(f"{where}: label values must lie in 0..255")
            label = label.astype(np.uint8)
        index = self._index_table[label]
        if label.size and index.min() < 0:
            self.check(label, where)
        return index

    def to_values(self, index: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Class indices ``(*S)`` -> the dataset's raw values ``(*S)`` uint8
        (for BraTS, class 3 -> label 4)."""
        if _is_tensor(index):
            import torch

            table = torch.tensor(self.values, dtype=torch.uint8, device=index.device)
            return table[index.long()]
        return np.asarray(self.values, dtype=np.uint8)[np.asarray(index)]

    def region_masks(self, label_values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw label values ``(*S)`` -> region masks ``(R, *S)`` bool, in :attr:`regions` order."""
        if _is_tensor(label_values):
            import torch

            table = torch.from_numpy(self._region_table).to(label_values.device)
            return table[:, label_values.long()]
        return self._region_table[:, np.asarray(label_values, dtype=np.intp)]

    def index_region_masks(self, index: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Class indices ``(*S)`` -> region masks ``(R, *S)`` bool."""
        return self.region_masks(self.to_values(index))
