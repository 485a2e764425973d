"""``medtune data``: generate a synthetic dataset or check one on disk.

    medtune data synth --out data/synth --cases 8 [--shape 64 64 48] [--seed 0]
    medtune data synth --kind shapes --out data/shapes [--images 150] [--image-size 32]
    medtune data synth --kind vqa --out data/vqa [--images 240] [--image-size 64]
    medtune data check data/synth [--layout auto]

The kinds and their flags come from :data:`medtune.data.synth.SYNTH_KINDS`.
"""

from __future__ import annotations

import argparse
import textwrap

from medtune.data.cases import LAYOUTS
from medtune.data.synth import SYNTH_KINDS, SynthOption, write_synthetic


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    kinds = "\n".join(
        textwrap.fill(SYNTH_KINDS.get(name).help, width=88, initial_indent=f"  {name:<11}", subsequent_indent=" " * 13)
        for name in SYNTH_KINDS
    )
    synth = sub.add_parser(
        "synth", help="write a generated dataset (--kind brats, shapes, referring or vqa)",
        description=f"Write a generated dataset into --out. Kinds:\n{kinds}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--kind", default="brats", choices=SYNTH_KINDS.names(),
                       help="what to generate (default brats); shapes and referring write the same set")
    synth.add_argument("--out", required=True, help="output folder (files already there are kept when identical, "
                       "and a different one is refused)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_synth_options(synth)

    check = sub.add_parser(
        "check", help="check files, shapes, voxel grids, label values and NaN/Inf of a dataset; "
        "list each case's orientation and spacing",
    )
    check.add_argument("root", help="dataset folder (or one case folder)")
    check.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (default auto)")
    check.add_argument("--modalities", nargs="+", default=None,
                       help="modality names in order (default: BraTS flair t1ce t1 t2 / all channels)")
    check.add_argument("--label-values", type=int, nargs="+", default=None,
                       help="allowed label values (default: BraTS 0 1 2 4 or dataset.json labels)")
    check.add_argument("--require-labels", action="store_true", help="a case without a label is a problem")


def _per_kind(values: list[tuple[str, str]]) -> str:
    """``"32 for shapes/referring, 64 for vqa"``; just ``"4"`` when every kind agrees."""
    kinds_of: dict[str, list[str]] = {}
    for kind, value in values:
        kinds_of.setdefault(value, []).append(kind)
    if len(kinds_of) == 1:
        return next(iter(kinds_of))
    return ", ".join(f"{value} for {'/'.join(kinds)}" for value, kinds in kinds_of.items())


def _add_synth_options(parser: argparse.ArgumentParser) -> None:
    """One flag per setting name over all kinds; its help names the kinds and their defaults."""
    uses: dict[str, list[tuple[str, SynthOption]]] = {}
    for kind in SYNTH_KINDS:
        for option in SYNTH_KINDS.get(kind).options:
            uses.setdefault(option.name, []).append((kind, option))
    for name, kind_options in uses.items():
        option = kind_options[0][1]
        if any((o.nargs, o.metavar, o.help) != (option.nargs, option.metavar, option.help) for _, o in kind_options):
            raise ValueError(f"synth setting '{name}' is declared differently by {[k for k, _ in kind_options]}")
        kinds = "/".join(kind for kind, _ in kind_options)
        shown = [(k, " ".join(map(str, o.default)) if o.nargs else str(o.default)) for k, o in kind_options]
        default = _per_kind(shown)
        minimum = _per_kind([(k, str(o.minimum)) for k, o in kind_options])
        # default None: only the flags given reach write_synthetic, which refuses another kind's flag
        parser.add_argument(option.flag, dest=name, type=int, nargs=option.nargs, default=None, metavar=option.metavar,
                            help=f"[{kinds}] {option.help}; default {default}; at least {minimum}")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        kind = SYNTH_KINDS.get(args.kind)
        names = {option.name for name in SYNTH_KINDS for option in SYNTH_KINDS.get(name).options}
        options = {name: getattr(args, name) for name in sorted(names) if getattr(args, name) is not None}
        written = write_synthetic(args.kind, args.out, seed=args.seed, **options)
        settings = ", ".join(f"{name} {value}" for name, value in kind.settings(options).items())
        print(f"wrote {len(written)} files of a generated {args.kind} set ({settings}, seed {args.seed}) to {args.out}"
              + ("" if written else " (all already there, identical)"))
        return 0

    from medtune.data.check import inspect_dataset
    from medtune.data.geometry import format_spacing

    report = inspect_dataset(
        args.root,
        layout=args.layout,
        modalities=args.modalities,
        label_values=args.label_values,
        require_labels=args.require_labels,
    )
    for case in report.cases:
        print(case.line())
    for problem in report.problems:
        print(problem)
    median = report.median_spacing
    outliers = report.spacing_outliers()
    if median is not None:
        print(f"median spacing (RAS axes): {format_spacing(median)}")
    for case in outliers:
        spacing = next(c.ras_spacing for c in report.cases if c.case_id == case)
        print(f"warning: case {case}: spacing {format_spacing(spacing)} (RAS axes) is more than 3x away from "
              f"the median on some axis; it is resampled like every case, but check it is the scan you mean")
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {args.root}")
        return 2
    orientations = sorted({c.orientation for c in report.cases})
    print(f"ok: {len(report.cases)} cases ({', '.join(orientations)} orientation"
          f"{'s' if len(orientations) > 1 else ''}{f'; {len(outliers)} spacing warning(s)' if outliers else ''})")
    return 0
