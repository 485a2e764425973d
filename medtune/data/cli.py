"""``medtune data``: generate a synthetic dataset or check one on disk.

    medtune data synth --out data/synth --cases 8 [--shape 64 64 48] [--seed 0]
    medtune data check data/synth [--layout auto]
"""

from __future__ import annotations

import argparse

from medtune.data.cases import LAYOUTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser("synth", help="write a synthetic BraTS-2020-style dataset (NIfTI)")
    synth.add_argument("--out", required=True, help="output folder (case folders are created in it)")
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


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from medtune.data.synth import synthesize_brats
        from medtune.errors import DataError

        if args.cases < 1 or min(args.shape) < 8:
            raise DataError(f"synth: need --cases >= 1 and every --shape size >= 8, got {args.cases}, {args.shape}")
        folders = synthesize_brats(args.out, cases=args.cases, shape=tuple(args.shape), seed=args.seed)
        print(f"wrote {len(folders)} cases of shape {tuple(args.shape)} to {args.out}")
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
