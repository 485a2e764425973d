"""``medtune export RUN --format F --out DIR``: a trained run's weights as a folder to share.

Formats, for every task (:func:`formats_of` lists what a run supports):

- ``full``: ``config.json`` + ``model.safetensors`` (self-contained).
- ``adapter`` (a model with an adapted backbone): ``config.json`` + ``adapter.json`` +
  ``adapter.safetensors`` (trained backbone tensors) + ``head.safetensors`` (the rest of
  the model: decoder, heads, text tower). The base backbone is *referenced*:
  ``adapter.json`` records its absolute path and sha256, checked on load (pass
  ``--base-weights`` if the file moved; ``--copy-base`` puts a copy beside the adapter).
  It is the same layout a run folder holds, so ``medtune.adapters.load_adapter`` and
  every medtune command read it.
- ``merged`` (LoRA): LoRA folded into the base weights -> ``config.json`` +
  ``model.safetensors`` of a plain model (adapter method ``full``). Methods that add
  modules (Med-Tuning, AdaptFormer, ...) cannot be folded.
- the task's own formats (:meth:`medtune.finetune.base.Task.export_formats`).

An export is written into a temporary folder beside ``--out`` and renamed when
complete, so a failed export leaves nothing behind; an ``--out`` holding a run or an
export, or naming a file, is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from medtune.checkpoints.io import save_safetensors
from medtune.checkpoints.runs import (
    BACKBONE_FILE,
    DEFAULT_CHECKPOINT,
    MODEL_FILE,
    RunConfig,
    read_run_config,
    write_run_config,
)
from medtune.errors import CheckpointError, ConfigError
from medtune.finetune.base import Loaded
from medtune.finetune.weights import adapted_backbone, load_trained, save_adapter_files

log = logging.getLogger(__name__)

GENERIC_FORMATS = ("full", "adapter", "merged")


def formats_of(loaded: Loaded) -> tuple[str, ...]:
    """The export formats a loaded run supports."""
    from medtune.adapters import find_adapted

    formats = ["full"]
    found = find_adapted(loaded.model)
    if found is not None:
        formats.append("adapter")
        if found[2].config.method == "lora":
            formats.append("merged")
    return (*formats, *loaded.task.export_formats(loaded))


def _refuse_method(loaded: Loaded, fmt: str, formats: tuple[str, ...]) -> None:
    from medtune.adapters import find_adapted

    found = find_adapted(loaded.model)
    method = found[2].config.method if found else None
    why = ""
    if fmt == "merged" and method is not None:
        why = (
            f": '{method}' has no low-rank update to fold into the base weights (only LoRA merges)"
            if method in ("full", "decoder-only")
            else f": '{method}' adds modules of its own that cannot be folded into the base weights (only LoRA merges)"
        )
    elif fmt == "adapter" and method is None:
        why = f": the {loaded.task.name} model has no adapter"
    raise ConfigError(f"cannot export {loaded.folder} as '{fmt}'{why}; this run exports as: {', '.join(formats)}")


def _check_out(out_dir: Path, run_dir: Path) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the run folder itself: its weight files would be overwritten")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty (an export never overwrites files); choose a new folder")


def _exported_config(loaded: Loaded, fmt: str, **extra) -> RunConfig:
    original = read_run_config(loaded.folder)
    derived = {**original.derived, "export": {"format": fmt, "from": str(loaded.folder.resolve()), **extra}}
    return RunConfig(original.task, dict(original.config), derived)


def _write(loaded: Loaded, folder: Path, fmt: str, copy_base: bool) -> None:
    if fmt == "full":
        save_safetensors(loaded.model.state_dict(), folder / MODEL_FILE, metadata={"task": loaded.task.name})
        write_run_config(folder, _exported_config(loaded, fmt))
    elif fmt == "adapter":
        base = loaded.base_weights or loaded.folder / BACKBONE_FILE
        if not base.is_file():
            raise CheckpointError(f"{loaded.folder}: no base backbone weights to reference ({BACKBONE_FILE})")
        if copy_base:
            shutil.copyfile(base, folder / BACKBONE_FILE)
            base = folder / BACKBONE_FILE
        save_adapter_files(loaded.model, folder, base, loaded.task.name)
        write_run_config(folder, _exported_config(loaded, fmt))
    elif fmt == "merged":
        from medtune.adapters import merge_lora

        merge_lora(adapted_backbone(loaded.model)[1])
        config = _exported_config(loaded, fmt, merged_from="lora")
        config.config["adapter"] = {"method": "full"}  # a plain model: every tensor is the backbone's own
        save_safetensors(loaded.model.state_dict(), folder / MODEL_FILE, metadata={"task": loaded.task.name})
        write_run_config(folder, config)
    else:
        loaded.task.export(loaded, folder, fmt)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    fmt: str,
    *,
    which: str = DEFAULT_CHECKPOINT,
    copy_base: bool = False,
    base_weights: str | Path | None = None,
) -> Path:
    """Export a run (or another export) of any task as ``fmt``; returns the export folder."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(out_dir, run_dir)
    loaded = load_trained(run_dir, which, base_weights=base_weights)
    formats = formats_of(loaded)
    if fmt not in formats:
        _refuse_method(loaded, fmt, formats)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal folder once renamed (mkdtemp makes it private)
        _write(loaded, Path(tmp), fmt, copy_base)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        Path(tmp).rename(out_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    log.info("exported %s as %s to %s", run_dir, fmt, out_dir)
    return out_dir


__all__ = ["GENERIC_FORMATS", "export_run", "formats_of"]
