"""``medtune params``: one table comparing tuning methods on one backbone.

    medtune params --backbone vit_base_patch16_224 --in-chans 4 --img-size 128 --slices 128 \\
        --methods full,decoder-only,lora,adaptformer,st-adapter,vpt,med-tuning --plot costs.png

Models are built on the meta device (no memory, no weights); see
:mod:`medtune.checkpoints.params` for how each column is measured. ``--flops-slices N``
counts FLOPs on N slices and scales linearly to ``--slices`` (exact for these models up
to edge effects; only needed when counting on a real device).

Whole 3D networks (``segment3d``) on ``(--img-size, --img-size, --slices)`` crops:

    medtune params --networks transbtsv2,cga_unet,unetr,swinunetr --img-size 128 --slices 128

A trained dynamic (Med-DANet) run: average GFLOPs per volume of a dataset, next to its
static whole-slice model (every case predicted, FLOPs counted):

    medtune params --dynamic RUN --data DATA

Self-distillation overhead, next to the plain model:

    medtune params ... --self-distill                 # volumetric masked-input branch, per method
    medtune params --referring configs/demo_referring.yaml   # CM-MaskSD on a referring model
                                                      # (a YAML recipe or a run folder)
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from medtune.checkpoints.params import (
    DEFAULT_METHODS,
    NETWORK_HEADERS,
    SELF_DISTILL_HEADERS,
    NetworkCost,
    SelfDistillCost,
    compare_methods,
    compare_networks,
    compare_self_distill,
    format_rows,
    format_table,
    plot_costs,
)
from medtune.config import parse_override, read_yaml
from medtune.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="backbone registry name (default vit_base_patch16_224; vit_*, swin_*, convnext_*, swinunetr, timm:<name>)")
    parser.add_argument("--in-chans", type=int, default=4, help="modalities M (default 4)")
    parser.add_argument("--img-size", type=int, default=128, help="slice side H = W (default 128)")
    parser.add_argument("--slices", type=int, default=128, help="slices T per volume (default 128)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated adapter methods (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--num-classes", type=int, default=4, help="output classes K, background included (default 4)")
    parser.add_argument("--flops-slices", type=int, default=None, help="count FLOPs on this many slices and scale to --slices (faster; default: all --slices)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="backbone option, e.g. --option depth=4 (repeatable)",
    )
    parser.add_argument("--decoder", default="auto", help="decoder registry name (default auto; upernet, unet, agln, unetr, multistage)")
    parser.add_argument(
        "--decoder-option", action="append", default=[], metavar="KEY=VALUE",
        help="decoder option, e.g. --decoder-option channels=64 (repeatable)",
    )
    parser.add_argument("--format", default="markdown", choices=("markdown", "csv", "json"),
                        help="table format on stdout (default markdown)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="also save a bar chart (any matplotlib format: .png, .svg, .pdf)")
    parser.add_argument(
        "--self-distill", action="store_true",
        help="also print each method's training-step FLOPs without and with masked-input "
        "self-distillation (finetune --self-distill) and the parameters it adds",
    )
    parser.add_argument(
        "--networks", default=None, metavar="NAMES",
        help="instead: comma-separated whole 3D networks of segment3d (transbtsv2, cga_unet, unetr, swinunetr) "
        "with their default options, on (--img-size, --img-size, --slices) crops",
    )
    parser.add_argument(
        "--referring", default=None, metavar="CONFIG_OR_RUN",
        help="instead: parameters and training FLOPs of a referring-segmentation model "
        "(YAML recipe or run folder) without and with the CM-MaskSD branches",
    )
    parser.add_argument(
        "--dynamic", default=None, metavar="RUN",
        help="instead: a trained dynamic (Med-DANet) run's GFLOPs per volume of --data, counted, "
        "next to its static whole-slice model",
    )
    parser.add_argument("--data", default=None, metavar="DIR", help="with --dynamic: the cases to count on")


def _options(items: list[str]) -> dict:
    options = {}
    for text in items:
        path, value = parse_override(text)
        options[".".join(path)] = value
    return options


def _referring_overhead(source: str, fmt: str) -> str:
    from dataclasses import dataclass

    from medtune.checkpoints.runs import read_run_config
    from medtune.finetune.referring.overhead import self_distill_overhead

    path = Path(source)
    data = read_run_config(path).config if path.is_dir() else read_yaml(path)
    if "model" not in data:
        raise ConfigError(f"{source}: no 'model' section (a referring recipe or run folder?)")
    cost = self_distill_overhead(data["model"])

    @dataclass
    class Row:
        model: str
        params: int
        train_gflops: float

    rows = [
        Row("plain", cost["params_plain"], cost["flops_plain"] / 1e9),
        Row("+ CM-MaskSD", cost["params_sd"], cost["flops_sd"] / 1e9),
    ]
    ratio = cost["flops_sd"] / max(cost["flops_plain"], 1)
    table = format_rows(rows, Row, ("model", "params", "train GFLOPs/step"), fmt)
    if fmt == "markdown":
        table += (
            f"\nCM-MaskSD adds {cost['params_sd'] - cost['params_plain']:,} parameters "
            f"and {ratio:.2f}x the training FLOPs per step"
        )
    return table


def run(args: argparse.Namespace) -> int:
    if args.dynamic:
        from medtune.finetune.dynamic.costs import DYNAMIC_HEADERS, DynamicCost, dynamic_costs

        if not args.data:
            raise ConfigError("--dynamic RUN needs --data DIR (the cases whose volumes are counted)")
        rows = dynamic_costs(args.dynamic, args.data, progress=args.format == "markdown")
        sys.stdout.write(format_rows(rows, DynamicCost, DYNAMIC_HEADERS, args.format) + "\n")
        return 0
    if args.referring:
        sys.stdout.write(_referring_overhead(args.referring, args.format) + "\n")
        return 0
    for flag in ("in_chans", "img_size", "slices", "num_classes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.networks:
        names = [n.strip() for n in args.networks.split(",") if n.strip()]
        crop = (args.img_size, args.img_size, args.slices)
        rows = compare_networks(names, args.in_chans, crop, args.num_classes)
        sys.stdout.write(format_rows(rows, NetworkCost, NETWORK_HEADERS, args.format) + "\n")
        return 0
    if args.plot:  # refuse an unknown image format before the (slow) measurements
        from matplotlib.figure import Figure

        kinds = Figure().canvas.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix not in kinds:
            raise ConfigError(f"--plot {args.plot}: unknown image format '{suffix}' (use one of: {', '.join(sorted(kinds))})")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = compare_methods(
        args.backbone, args.in_chans, args.img_size, args.slices, methods,
        num_classes=args.num_classes, flops_slices=args.flops_slices,
        backbone_options=_options(args.option), decoder_options=_options(args.decoder_option), decoder=args.decoder,
    )
    sys.stdout.write(format_table(rows, args.format) + "\n")
    if args.plot:
        title = f"{args.backbone}, {args.in_chans}x{args.img_size}x{args.img_size}x{args.slices}"
        plot_costs(rows, args.plot, title)
    if args.self_distill:
        sd_rows = compare_self_distill(
            args.backbone, args.in_chans, args.img_size, args.slices, methods,
            num_classes=args.num_classes, flops_slices=args.flops_slices,
            backbone_options=_options(args.option), decoder_options=_options(args.decoder_option),
        )
        sys.stdout.write("\nmasked-input self-distillation (--self-distill), one training step per volume:\n")
        sys.stdout.write(format_rows(sd_rows, SelfDistillCost, SELF_DISTILL_HEADERS, args.format) + "\n")
    return 0
