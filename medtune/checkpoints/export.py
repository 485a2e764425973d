"""``medtune export RUN --format F --out DIR``: a run's weights as a folder to share.

Formats of a finetuning run (any task; :func:`formats_of` lists what a run supports):

- ``full``: ``config.json`` + ``model.safetensors`` (self-contained, medtune's names).
- ``adapter`` (a model with an adapted backbone, not full finetuning): ``config.json`` +
  ``adapter.json`` + ``adapter.safetensors`` (trained backbone tensors) +
  ``head.safetensors`` (the rest of the model: decoder, heads, text tower). The base
  backbone is *referenced*: ``adapter.json`` records its absolute path and sha256,
  checked on load (pass ``--base-weights`` if the file moved; ``--copy-base`` puts a copy
  beside the adapter). It is the same layout a run folder holds, so
  ``medtune.adapters.load_adapter`` and every medtune command read it. A LoRA adapter
  is also a real peft folder: ``adapter_config.json`` + ``adapter_model.safetensors``
  (:mod:`medtune.checkpoints.interop`), which ``PeftModel.from_pretrained(timm_model,
  DIR)`` loads; the other methods keep medtune's names only, which no tool mistakes
  for peft's.
- ``merged`` (LoRA): LoRA folded into the base weights -> ``config.json`` +
  ``model.safetensors`` of a plain model (adapter method ``full``).
- ``timm`` / ``monai``: the backbone alone in timm's or MONAI's own names
  (``model.safetensors`` + ``config.json``) when it is a plain network: no adapter, full
  finetuning, decoder-only, or LoRA (merged in).
- ``hub``: a folder to upload to the Hugging Face Hub as is (:mod:`medtune.checkpoints.hub`):
  the ``adapter`` export with its base backbone inside (``base/``, timm's or MONAI's
  names) or the ``full`` export, and a ``README.md`` model card.
- the task's own formats (:meth:`medtune.finetune.base.Task.export_formats`; segmentation: ``onnx``).

A pretraining run exports its encoder: ``timm`` (timm backbones) or ``monai``
(``swinunetr``), and ``hub`` (that folder + the model card).

An export is written into a temporary folder beside ``--out`` and renamed when
complete, so a failed or refused export leaves nothing behind; an ``--out`` holding a
run or an export, or naming a file, is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medtune.checkpoints.interop import (
    FAMILY_FORMAT,
    PlainBackbone,
    backbone_section,
    find_backbone,
    plain_backbone,
    pretraining_backbone,
    why_not_peft,
    why_not_plain,
    write_backbone,
    write_peft_folder,
)
from medtune.checkpoints.io import save_safetensors
from medtune.checkpoints.runs import (
    BACKBONE_FILE,
    BASE_DIR,
    DEFAULT_CHECKPOINT,
    MODEL_FILE,
    PRETRAIN_TASK,
    RunConfig,
    read_run_config,
    write_run_config,
)
from medtune.errors import CheckpointError, ConfigError
from medtune.finetune.base import Loaded
from medtune.finetune.weights import adapted_backbone, load_trained, save_adapter_files

log = logging.getLogger(__name__)

GENERIC_FORMATS = ("full", "adapter", "merged", "timm", "monai", "hub")


@dataclass
class Source:
    """What an export reads: a finetuning run (``loaded``) or a pretraining run's encoder (``encoder``)."""

    folder: Path
    run_config: RunConfig
    loaded: Loaded | None = None
    encoder: PlainBackbone | None = None


def read_source(run_dir: Path, which: str = DEFAULT_CHECKPOINT, base_weights: str | Path | None = None) -> Source:
    """A run or export folder, read for exporting (pretraining runs: the encoder only)."""
    run_config = read_run_config(run_dir)
    if run_config.task == PRETRAIN_TASK:
        return Source(run_dir, run_config, encoder=pretraining_backbone(run_dir, run_config))
    return Source(run_dir, run_config, loaded=load_trained(run_dir, which, base_weights=base_weights))


def _method(loaded: Loaded) -> str | None:
    from medtune.adapters import find_adapted

    found = find_adapted(loaded.model)
    return found[2].config.method if found else None


def _backbone_format(loaded: Loaded) -> str | None:
    backbone = find_backbone(loaded.model)
    return FAMILY_FORMAT.get(backbone.family, "timm") if backbone is not None else None


def formats_of(loaded: Loaded) -> tuple[str, ...]:
    """The export formats a loaded finetuning run supports."""
    method = _method(loaded)
    formats = ["full"]
    if method is not None and method != "full" and not (method == "lora" and why_not_peft(loaded.model)):
        formats.append("adapter")
    if method == "lora":
        formats.append("merged")
    if why_not_plain(loaded.model) is None:
        formats.append(_backbone_format(loaded))
    formats.append("hub")
    return (*formats, *loaded.task.export_formats(loaded))


def source_formats(source: Source) -> tuple[str, ...]:
    """The export formats of a run: :func:`formats_of`, or a pretraining run's encoder formats."""
    if source.loaded is not None:
        return formats_of(source.loaded)
    return (source.encoder.format, "hub")


def _why_not(source: Source, fmt: str) -> str:
    """Why ``source`` cannot be exported as ``fmt`` (for the refusal's message)."""
    loaded = source.loaded
    if loaded is None:
        if fmt in ("timm", "monai"):
            name = source.encoder.section["name"]
            return f"the backbone '{name}' is {source.encoder.format.replace('monai', 'MONAI')}'s, not {fmt}'s"
        return f"a pretraining run exports its encoder only (finetune it for '{fmt}')"
    method = _method(loaded)
    if fmt == "adapter":
        if method is None:
            return f": the {loaded.task.name} model has no adapter"
        if method == "full":
            return ": full finetuning trains every backbone tensor, there is no adapter to separate from the base"
        return f": {why_not_peft(loaded.model)}"
    if fmt == "merged" and method is not None:
        if method in ("full", "decoder-only"):
            return f": '{method}' has no low-rank update to fold into the base weights (only LoRA merges)"
        return f": '{method}' adds modules of its own that cannot be folded into the base weights (only LoRA merges)"
    if fmt in ("timm", "monai"):
        why = why_not_plain(loaded.model)
        if why is None:
            name = backbone_section(find_backbone(loaded.model))["name"]
            return f": the backbone '{name}' is {_backbone_format(loaded).replace('monai', 'MONAI')}'s, not {fmt}'s"
        return f": {why}"
    if fmt not in GENERIC_FORMATS:
        return f": '{fmt}' is not an export format of a {loaded.task.name} run"
    return ""


def _refuse(source: Source, fmt: str, formats: tuple[str, ...]) -> None:
    why = _why_not(source, fmt)
    why = why if not why or why.startswith(":") else f": {why}"
    raise ConfigError(f"cannot export {source.folder} as '{fmt}'{why}; this run exports as: {', '.join(formats)}")


def _check_out(out_dir: Path, run_dir: Path) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the run folder itself: its weight files would be overwritten")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty (an export never overwrites files); choose a new folder")


def export_record(source: Source, fmt: str, **extra) -> dict:
    """Where an export came from (recorded in its config): the run folder's path, or for a
    Hub folder, which leaves this machine, its name only."""
    origin = source.folder.resolve()
    return {"format": fmt, "from": origin.name if fmt == "hub" else str(origin), **extra}


def shareable_config(config: dict) -> dict:
    """A run config to publish: the dataset folder and a local pretrained backbone by name,
    not by their paths on this machine (loading reads neither)."""
    from medtune.models.hub import is_hub_spec

    shared = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    if isinstance(shared.get("data"), dict) and shared["data"].get("root"):
        shared["data"]["root"] = Path(str(shared["data"]["root"])).name
    pretrained = shared["backbone"].get("pretrained") if isinstance(shared.get("backbone"), dict) else None
    if pretrained and not is_hub_spec(pretrained):
        shared["backbone"]["pretrained"] = Path(str(pretrained)).name
    return shared


def _exported_config(source: Source, fmt: str, **extra) -> RunConfig:
    original = source.run_config
    derived = {**original.derived, "export": export_record(source, fmt, **extra)}
    config = shareable_config(original.config) if fmt == "hub" else dict(original.config)
    return RunConfig(original.task, config, derived)


# --------------------------------------------------------------------------- writing


def _write_full(source: Source, folder: Path, fmt: str = "full") -> None:
    loaded = source.loaded
    save_safetensors(loaded.model.state_dict(), folder / MODEL_FILE, metadata={"task": loaded.task.name})
    write_run_config(folder, _exported_config(source, fmt))


def _write_adapter(source: Source, folder: Path, copy_base: bool, fmt: str = "adapter") -> None:
    loaded = source.loaded
    base = loaded.base_weights or loaded.folder / BACKBONE_FILE
    if not base.is_file():
        raise CheckpointError(f"{loaded.folder}: no base backbone weights to reference ({BACKBONE_FILE})")
    if fmt == "hub" and find_backbone(loaded.model) is not None:
        base = _write_base(loaded, base, folder / BASE_DIR, export_record(source, fmt))
    elif copy_base or fmt == "hub":
        shutil.copyfile(base, folder / BACKBONE_FILE)
        base = folder / BACKBONE_FILE
    save_adapter_files(loaded.model, folder, base, loaded.task.name)
    if _method(loaded) == "lora":
        write_peft_folder(loaded.model, folder)
    write_run_config(folder, _exported_config(source, fmt))


def _write_base(loaded: Loaded, base: Path, folder: Path, record: dict) -> Path:
    """The base backbone file of an adapted model as a timm/MONAI export in ``folder``."""
    from medtune.checkpoints.io import load_state, load_weights
    from medtune.config import from_dict
    from medtune.models.backbones import BackboneConfig, create_backbone

    section = backbone_section(find_backbone(loaded.model))
    plain = create_backbone(from_dict(BackboneConfig, {**section, "pretrained": None}, "backbone"))
    load_state(plain, load_weights(base), strict=True, source=base)
    folder.mkdir()
    write_backbone(PlainBackbone(plain.eval(), section, "base backbone"), folder, record)
    return folder / MODEL_FILE


def _write_finetuned(source: Source, folder: Path, fmt: str, copy_base: bool, repo: str | None) -> None:
    loaded = source.loaded
    if fmt == "full":
        _write_full(source, folder)
    elif fmt == "adapter":
        _write_adapter(source, folder, copy_base)
    elif fmt == "merged":
        from medtune.adapters import merge_lora

        merge_lora(adapted_backbone(loaded.model)[1])
        config = _exported_config(source, fmt, merged_from="lora")
        config.config["adapter"] = {"method": "full"}  # a plain model: every tensor is the backbone's own
        save_safetensors(loaded.model.state_dict(), folder / MODEL_FILE, metadata={"task": loaded.task.name})
        write_run_config(folder, config)
    elif fmt in ("timm", "monai"):
        method = _method(loaded) or "finetuned"
        write_backbone(plain_backbone(loaded.model, f"{method} backbone"), folder, export_record(source, fmt))
    elif fmt == "hub":
        from medtune.checkpoints.hub import write_model_card

        method = _method(loaded)
        if method not in (None, "full"):
            _write_adapter(source, folder, copy_base=True, fmt="hub")
        else:
            _write_full(source, folder, "hub")
        write_model_card(source, folder, repo)
    else:
        loaded.task.export(loaded, folder, fmt)
        write_run_config(folder, _exported_config(source, fmt))


def _write_pretrained(source: Source, folder: Path, fmt: str, repo: str | None) -> None:
    write_backbone(source.encoder, folder, export_record(source, fmt, task=PRETRAIN_TASK))
    if fmt == "hub":
        from medtune.checkpoints.hub import write_model_card

        write_model_card(source, folder, repo)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    fmt: str,
    *,
    which: str = DEFAULT_CHECKPOINT,
    copy_base: bool = False,
    base_weights: str | Path | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Export a run (a finetuning run, an export of one, or a pretraining run) as ``fmt``.

    ``push_to_hub``: a Hub repository id to upload a ``hub`` export to (needs
    ``huggingface_hub`` and a token; checked before anything is written). Returns the
    export folder.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(out_dir, run_dir)
    if push_to_hub is not None:
        from medtune.checkpoints.hub import check_can_push

        if fmt != "hub":
            raise ConfigError(f"--push-to-hub uploads a Hub folder: use --format hub, not '{fmt}'")
        check_can_push(push_to_hub)
    source = read_source(run_dir, which, base_weights)
    formats = source_formats(source)
    if fmt not in formats:
        _refuse(source, fmt, formats)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal folder once renamed (mkdtemp makes it private)
        if source.loaded is not None:
            _write_finetuned(source, Path(tmp), fmt, copy_base, push_to_hub)
        else:
            _write_pretrained(source, Path(tmp), fmt, push_to_hub)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        Path(tmp).rename(out_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    log.info("exported %s as %s to %s", run_dir, fmt, out_dir)
    if push_to_hub is not None:
        from medtune.checkpoints.hub import push_folder

        push_folder(out_dir, push_to_hub)
    return out_dir


__all__ = ["GENERIC_FORMATS", "Source", "export_run", "formats_of", "read_source", "source_formats"]
