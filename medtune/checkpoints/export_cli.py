"""``medtune export RUN --format adapter|full|merged --out DIR``: safetensors exports.

See :mod:`medtune.checkpoints.export` for what each format holds.
"""

from __future__ import annotations

import argparse
import sys

from medtune.checkpoints.export import FORMATS, export_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="finetune run folder (or an export)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="adapter, full or merged (LoRA only)")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which weights of the run")
    parser.add_argument(
        "--copy-base", action="store_true",
        help="adapter format: copy the base backbone.safetensors into the export instead of referencing it",
    )


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, args.format, which=args.checkpoint, copy_base=args.copy_base)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    sys.stdout.write(f"exported {args.run} as {args.format} to {out}: {files}\n")
    return 0
