"""``medtune data``: generate a synthetic dataset or check one on disk.

    medtune data synth --out data/synth --cases 8 [--shape 64 64 48] [--seed 0]
    medtune data check data/synth [--layout auto]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import tempfile
from pathlib import Path

from medtune.data.cases import LAYOUTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser("synth", help="write a synthetic BraTS-2020-style dataset (NIfTI)")
    synth.add_argument("--out", required=True, help="output folder (case folders are created in it; files already there are kept "
                       "when identical, and a different one is refused)")
    synth.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    synth.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), metavar=("H", "W", "D"),
                       help="volume shape (default 64 64 48)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    check = sub.add_parser("check", help="check files, shapes, label values and NaN/Inf of a dataset")
    check.add_argument("root", help="dataset folder")
    check.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (default auto)")
    check.add_argument("--modalities", nargs="+", default=None,
                       help="modality names in order (default: BraTS flair t1ce t1 t2 / all channels)")
    check.add_argument("--label-values", type=int, nargs="+", default=None,
                       help="allowed label values (default: BraTS 0 1 2 4 or dataset.json labels)")
    check.add_argument("--require-labels", action="store_true", help="a case without a label is a problem")


def write_synthetic(out: str | Path, cases: int, shape: tuple[int, int, int], seed: int) -> list[Path]:
    """``synthesize_brats`` without touching what is already on disk.

    Generates into a temporary folder next to ``out``, then moves in only the files
    that are missing; a file that exists with other content (another dataset, other
    --shape/--seed) is refused by name. Re-running the same command writes nothing.
    Returns the files written.
    """
    from medtune.data.synth import synthesize_brats
    from medtune.errors import DataError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"synth: --out {out} is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.synth-", dir=out.parent) as tmp:
        synthesize_brats(tmp, cases=cases, shape=shape, seed=seed)
        generated = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        for name in generated:
            target = out / name
            if target.exists() and (not target.is_file() or not filecmp.cmp(target, Path(tmp) / name, shallow=False)):
                raise DataError(
                    f"synth: {target} already exists with other content; choose another --out "
                    f"(nothing was written)"
                )
        written = []
        for name in generated:
            target = out / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / name, target)
                written.append(target)
    return written


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from medtune.errors import DataError

        if args.cases < 1 or min(args.shape) < 8:
            raise DataError(f"synth: need --cases >= 1 and every --shape size >= 8, got {args.cases}, {args.shape}")
        written = write_synthetic(args.out, args.cases, tuple(args.shape), args.seed)
        print(f"wrote {len(written)} files of {args.cases} cases of shape {tuple(args.shape)} to {args.out}"
              + ("" if written else " (all already there, identical)"))
        return 0

    from medtune.data.check import check_dataset, count_cases

    problems = check_dataset(
        args.root,
        layout=args.layout,
        modalities=args.modalities,
        label_values=args.label_values,
        require_labels=args.require_labels,
    )
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.root}")
        return 2
    print(f"ok: {count_cases(args.root, args.layout, args.modalities)} cases")
    return 0
