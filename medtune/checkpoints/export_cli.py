"""``medtune export RUN --format FORMAT --out DIR [--push-to-hub ORG/NAME]``: a run's weights as a folder to share.

See :mod:`medtune.checkpoints.export` for what each format holds; which formats a run
supports depends on its task and adapter method (a refused format lists the others).
"""

from __future__ import annotations

import argparse
import sys

from medtune.checkpoints.export import GENERIC_FORMATS, export_run
from medtune.checkpoints.runs import CHECKPOINTS, DEFAULT_CHECKPOINT


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    parser.add_argument("run", help="a finetuning run folder (or an export of one), or a pretraining run folder")
    parser.add_argument(
        "--format", required=True,
        help=f"{', '.join(GENERIC_FORMATS)}, or a format of the run's task (segmentation: onnx); "
        "a pretraining run: timm or monai (its encoder), hub",
    )
    parser.add_argument("--out", required=True, help="export folder (new, or empty)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, choices=CHECKPOINTS,
                        help=f"which weights of the run (default {DEFAULT_CHECKPOINT})")
    parser.add_argument(
        "--copy-base", action="store_true",
        help="adapter format: copy the base backbone.safetensors into the export instead of referencing it",
    )
    parser.add_argument("--base-weights", default=None, help="base backbone file of an adapter export, if moved")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="ORG/NAME",
        help="hub format: upload the folder to this Hugging Face repository (needs huggingface_hub and a token)",
    )


def run(args: argparse.Namespace) -> int:
    out = export_run(
        args.run, args.out, args.format, which=args.checkpoint, copy_base=args.copy_base,
        base_weights=args.base_weights, push_to_hub=args.push_to_hub,
    )
    files = ", ".join(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    sys.stdout.write(f"exported {args.run} as {args.format} to {out}: {files}\n")
    return 0
