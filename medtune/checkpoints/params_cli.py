"""``medtune params``: one table comparing tuning methods on one backbone.

    medtune params --backbone vit_base_patch16_224 --in-chans 4 --img-size 128 --slices 128 \\
        --methods full,decoder-only,lora,adaptformer,st-adapter,vpt,med-tuning --plot costs.png

Models are built on the meta device (no memory, no weights); see
:mod:`medtune.checkpoints.params` for how each column is measured. ``--flops-slices N``
counts FLOPs on N slices and scales linearly to ``--slices`` (exact for these models up
to edge effects; only needed when counting on a real device).
"""

from __future__ import annotations

import argparse
import sys

from medtune.checkpoints.params import DEFAULT_METHODS, compare_methods, format_table, plot_costs
from medtune.config import parse_override


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="backbone registry name")
    parser.add_argument("--in-chans", type=int, default=4, help="modalities M")
    parser.add_argument("--img-size", type=int, default=128, help="slice side H = W")
    parser.add_argument("--slices", type=int, default=128, help="slices T per volume")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated adapter methods")
    parser.add_argument("--num-classes", type=int, default=4, help="output classes K")
    parser.add_argument("--flops-slices", type=int, default=None, help="count FLOPs on this many slices, scale to --slices")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="backbone option, e.g. --option depth=4 (repeatable)",
    )
    parser.add_argument(
        "--decoder-option", action="append", default=[], metavar="KEY=VALUE",
        help="decoder option, e.g. --decoder-option channels=64 (repeatable)",
    )
    parser.add_argument("--format", default="markdown", choices=("markdown", "csv", "json"))
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="also save a bar chart")


def _options(items: list[str]) -> dict:
    options = {}
    for text in items:
        path, value = parse_override(text)
        options[".".join(path)] = value
    return options


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = compare_methods(
        args.backbone, args.in_chans, args.img_size, args.slices, methods,
        num_classes=args.num_classes, flops_slices=args.flops_slices,
        backbone_options=_options(args.option), decoder_options=_options(args.decoder_option),
    )
    sys.stdout.write(format_table(rows, args.format) + "\n")
    if args.plot:
        title = f"{args.backbone}, {args.in_chans}x{args.img_size}x{args.img_size}x{args.slices}"
        plot_costs(rows, args.plot, title)
    return 0
