"""Which labeled cases train and which validate: a hashed split, k folds, or nnU-Net's file.

Three ways, one result (the training and validation cases of one fold):

- default: ``val_fraction`` of the cases, chosen by a hash of their ids
  (:func:`split_cases`): adding a case moves no other case across;
- ``data.folds: K``: a deterministic K-fold split (:func:`kfold_splits`), the cases
  ordered by a hash of their ids and dealt to the folds in turn; ``data.fold`` picks one;
- ``data.split: PATH``: an nnU-Net ``splits_final.json`` (a list of
  ``{"train": [...], "val": [...]}``, one per fold) with ``data.fold``.

Every run writes the folds it chose from into its folder as ``splits_final.json`` (the
same format), so another run (or nnU-Net) can reuse the exact split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from medtune.data.cases import Case
from medtune.errors import ConfigError, DataError


def _ranked(case_ids: Sequence[str]) -> list[str]:
    return sorted(case_ids, key=lambda c: hashlib.sha1(c.encode()).hexdigest())


def split_cases(cases: list[Case], val_fraction: float) -> tuple[list[Case], list[Case]]:
    """Deterministic train/val split: cases ordered by a hash of their id, the first
    ``round(n * val_fraction)`` go to validation (at least one when ``val_fraction > 0``
    and there are two or more cases). Adding a case moves no other case across.
    """
    if val_fraction <= 0 or len(cases) < 2:
        return list(cases), []
    ranked = _ranked([c.case_id for c in cases])
    n_val = min(max(1, int(len(cases) * val_fraction + 0.5)), len(cases) - 1)
    val_ids = set(ranked[:n_val])
    return [c for c in cases if c.case_id not in val_ids], [c for c in cases if c.case_id in val_ids]


def kfold_splits(case_ids: Sequence[str], folds: int) -> list[dict[str, list[str]]]:
    """``folds`` folds of ``case_ids``: ordered by a hash of the id, dealt out in turn, so
    every case validates in exactly one fold. nnU-Net's ``splits_final.json`` format."""
    if folds < 2:
        raise ConfigError(f"data.folds must be at least 2, got {folds}")
    if len(case_ids) < folds:
        raise DataError(f"{len(case_ids)} labeled cases cannot make {folds} folds")
    ranked = _ranked(case_ids)
    out = []
    for fold in range(folds):
        val = set(ranked[fold::folds])
        out.append({"train": sorted(c for c in case_ids if c not in val), "val": sorted(val)})
    return out


def read_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """An nnU-Net ``splits_final.json``: a list of ``{"train": [...], "val": [...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.split: file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.split: cannot read {path} ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: a split file is a list of {{\"train\": [...], \"val\": [...]}}, one per fold")
    for fold, entry in enumerate(data):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("train", "val")):
            raise ConfigError(f"{path}: fold {fold} is not {{\"train\": [...], \"val\": [...]}}")
        if not all(isinstance(c, str) for k in ("train", "val") for c in entry[k]):
            raise ConfigError(f"{path}: fold {fold} lists case ids that are not strings")
    return [{"train": list(e["train"]), "val": list(e["val"])} for e in data]


def choose_fold(cases: list[Case], splits: list[dict[str, list[str]]], fold: int,
                where: str) -> tuple[list[Case], list[Case]]:
    """The training and validation cases of fold ``fold``; case ids the split names but
    the dataset lacks are refused, all of them named."""
    if not 0 <= fold < len(splits):
        raise ConfigError(f"data.fold {fold} is not a fold of {where} (it has folds 0..{len(splits) - 1})")
    chosen = splits[fold]
    known = {c.case_id for c in cases}
    unknown = sorted({c for k in ("train", "val") for c in chosen[k]} - known)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise DataError(f"{where}: fold {fold} names cases that are not in the dataset: {shown}")
    both = sorted(set(chosen["train"]) & set(chosen["val"]))
    if both:
        raise DataError(f"{where}: fold {fold} puts cases in both train and val: {', '.join(both[:10])}")
    by_id = {c.case_id: c for c in cases}
    return [by_id[c] for c in sorted(chosen["train"])], [by_id[c] for c in sorted(chosen["val"])]


def plan_split(cases: list[Case], *, val_fraction: float, split: str | None, folds: int | None,
               fold: int) -> tuple[list[Case], list[Case], list[dict[str, Any]]]:
    """``(train, val, splits)``: the cases of the chosen fold and every fold (nnU-Net's
    format; the hashed split is one fold)."""
    if split is not None:
        splits = read_splits(split)
        train, val = choose_fold(cases, splits, fold, split)
        return train, val, splits
    if folds is not None:
        splits = kfold_splits([c.case_id for c in cases], folds)
        train, val = choose_fold(cases, splits, fold, f"data.folds {folds}")
        return train, val, splits
    if fold != 0:
        raise ConfigError(f"data.fold {fold} needs data.folds or data.split")
    train, val = split_cases(cases, val_fraction)
    return train, val, [{"train": [c.case_id for c in train], "val": [c.case_id for c in val]}]


__all__ = ["choose_fold", "kfold_splits", "plan_split", "read_splits", "split_cases"]
