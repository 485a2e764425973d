"""The ``medtune`` command: a thin layer over library functions.

Each subcommand lives next to the code it drives, in a module that exposes
``add_arguments(parser, argv)`` and ``run(args) -> int``; this file only lists them.
``argv`` (the whole command line) lets a command add the flags of the task it will run
(``medtune finetune --task vqa``, ``medtune predict --model RUN``). Any
:class:`~medtune.errors.MedtuneError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medtune.errors import MedtuneError

# name -> (module holding add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("medtune.data.cli", "generate (synth) or verify (check) a dataset"),
    "pretrain": ("medtune.pretrain.cli", "self-supervised pretraining: FreMAE, MAE, SimMIM, MFM"),
    "finetune": ("medtune.finetune.cli", "finetune a backbone (adapters, LoRA, ...) on labeled data"),
    "predict": ("medtune.finetune.predict_cli", "predict label maps / masks / answers with a run"),
    "evaluate": ("medtune.finetune.evaluate_cli", "score predicted label maps against ground truth"),
    "export": ("medtune.checkpoints.export_cli", "export a run's weights as safetensors"),
    "params": ("medtune.checkpoints.params_cli", "compare methods by parameters, size and FLOPs"),
}


RESUME_HELP = (
    "continue a run: 'latest' (the newest saved state of --output, or without --output of the newest "
    "checkpoints/<config stem>-* run), 'latest-valid' (the newest whose files are whole), or a run / "
    "state/step_N folder; without it, an --output that holds a run (trained weights or state/) is refused"
)


def add_run_arguments(parser: argparse.ArgumentParser, *, config_required: bool, output_help: str) -> None:
    """The flags every training command shares: --config, --data, --output, --set, --resume, --allow-download."""
    parser.add_argument("--config", required=config_required, default=None, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--data", default=None, help="dataset folder (sets data.root)")
    parser.add_argument("--output", default=None, help=output_help)
    parser.add_argument(
        "--set", dest="set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config values, e.g. --set train.max_steps=10 train.optim.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--resume", default=None, metavar="latest|latest-valid|DIR", help=RESUME_HELP)
    parser.add_argument(
        "--allow-download", action="store_true",
        help="fetch the hf-hub:ORG/NAME weights the config names into the Hugging Face cache before the run "
        "(without it they must be in the cache already: medtune never downloads at run time)",
    )


def fetch_downloads(args: argparse.Namespace, config) -> None:
    """``--allow-download``: fetch the ``hf-hub:`` repositories a config (dataclass or
    mapping) names before a run; without the flag, nothing."""
    if getattr(args, "allow_download", False):
        import dataclasses

        from medtune.config import to_dict
        from medtune.models.hub import fetch_hub_specs

        fetch_hub_specs(to_dict(config) if dataclasses.is_dataclass(config) else config)


def peek(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``) before parsing, or None."""
    peeker = argparse.ArgumentParser(add_help=False)
    peeker.add_argument(flag, default=None)
    known, _ = peeker.parse_known_args(argv)
    return getattr(known, flag.lstrip("-").replace("-", "_"))


def build_parser(only: str | None = None, argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune",
        description="medtune: self-supervised pretraining and parameter-efficient finetuning "
        "for medical imaging. Run `medtune COMMAND --help` for a command's flags.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported, so `medtune --help` and
        # `medtune data ...` stay light.
        if only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sp, list(argv or []))
            sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    try:
        parser = build_parser(only=chosen, argv=argv)
    except MedtuneError as exc:  # e.g. the run folder that decides a command's flags is unreadable
        print(f"medtune: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # Accelerate logs every file of every save_state at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        return int(args._module.run(args) or 0)
    except MedtuneError as exc:
        return _error(str(exc), exc)
    except OSError as exc:
        if exc.filename is None:  # not about a file: a bug to see in full
            raise
        # a folder that is not writable, a full disk, a path that is a file: the user's to fix
        return _error(f"{exc.strerror or type(exc).__name__}: {exc.filename}", exc)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("medtune: interrupted", file=sys.stderr)
        return 130


def _error(message: str, exc: BaseException | None = None) -> int:
    """One line on stderr, on a line of its own, and exit code 2.

    An error that every rank of a launched run raised together is reported by every rank
    before any exits (:func:`medtune.distributed.settle_shared_error`).
    """
    _close_progress_bars()
    print(f"medtune: error: {message}", file=sys.stderr)
    if exc is not None:
        from medtune.distributed import settle_shared_error

        settle_shared_error(exc)
    return 2


def _close_progress_bars() -> None:
    """End the line of any progress bar still drawn, so that a message gets its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
