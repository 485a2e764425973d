"""Local pretrained weights for backbones: read, adapt to our shapes, load with a report.

Accepted sources (never downloaded):

- a medtune ``backbone.safetensors`` (keys ``model.<...>``, exactly ``backbone.state_dict()``),
- a medtune run folder (its ``backbone.safetensors``, else its ``model.safetensors``), or a
  ``medtune export --format timm|monai|hub`` folder (its ``model.safetensors``),
- a plain timm state dict (``.safetensors``/``.pth``/``.pt``/``.npz``, keys without our
  ``model.`` prefix), also wrapped in ``module.`` (DDP) or ``_orig_mod.`` (torch.compile),
- a medtune ``model.safetensors``, a MONAI SwinUNETR checkpoint or an open_clip model
  with a timm image tower (BiomedCLIP): only the tensors under ``backbone.`` / ``swinViT.``
  / ``visual.trunk.`` are taken; the rest (decoders, text towers) is reported as unexpected,
- ``hf-hub:ORG/NAME``: any of the above in the local Hugging Face cache (:mod:`medtune.models.hub`).

The adaptation is a chain of small filters, timm-style, each ``(state, backbone) -> state``:
``normalize_keys`` (prefixes), ``drop_classifier`` (heads), ``adapt_stem`` (a 3-channel
stem to ``in_chans`` modalities with ``timm.models.adapt_input_conv``),
``resample_pos_embed`` (ViT position embeddings to our patch grid),
``resize_relative_position_tables`` (Swin window bias tables to our window) and
``keep_own_derived_buffers`` (index tables are computed, never loaded). Whatever still
differs in shape is refused with a :class:`CheckpointError` naming the tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from medtune.checkpoints.io import LoadReport, load_json, load_state, load_weights
from medtune.checkpoints.runs import BACKBONE_FILE, CONFIG_FILE, DECODER_FILE, MODEL_FILE, read_run_config
from medtune.errors import CheckpointError
from medtune.models.hub import hub_json, hub_weight_file, is_hub_spec

if TYPE_CHECKING:  # annotations only: backbones.py imports this module to load weights
    from medtune.models.backbones import Backbone

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
# wrappers around a whole state dict: DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# sub-models holding a backbone inside a larger checkpoint: medtune models, MONAI SwinUNETR,
# open_clip's timm image tower (BiomedCLIP)
SUBMODEL_PREFIXES = ("backbone.", "swinViT.", "visual.trunk.")
# buffers computed from the architecture, not learned
DERIVED_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")


def resolve_weight_path(path: str | Path) -> Path:
    """A weight file as given; a folder's ``backbone.safetensors`` (a run) or else its
    ``model.safetensors`` (a finetuning run, a timm/MONAI/Hub export); ``hf-hub:ORG/NAME``
    from the local Hugging Face cache."""
    if is_hub_spec(path):
        return hub_weight_file(path)
    path = Path(path)
    if path.is_dir():
        for name in (BACKBONE_FILE, MODEL_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"folder {path} has no {BACKBONE_FILE} or {MODEL_FILE}")
    if not path.is_file():
        raise CheckpointError(f"pretrained weights not found: {path}")
    return path


def exported_backbone_section(config: Any) -> dict[str, Any] | None:
    """The backbone section a timm/MONAI/Hub export records in its ``config.json``
    (``{"medtune": {"backbone": ...}}``), or None for other configs."""
    record = config.get("medtune") if isinstance(config, dict) else None
    section = record.get("backbone") if isinstance(record, dict) else None
    return dict(section) if isinstance(section, dict) else None


def pretrained_section(path: str | Path) -> dict[str, Any]:
    """What ``--backbone PATH`` puts into a run config's ``backbone:`` section.

    A run folder (pretraining, or any run with a ``backbone`` section and
    ``backbone.safetensors``), a timm/MONAI/Hub export folder, or an ``hf-hub:`` repository
    exported by medtune: the architecture it records, with ``pretrained`` pointing at it.
    A weight file or another Hub repository: ``{"pretrained": PATH}`` only (the
    architecture stays the config's).
    """
    if is_hub_spec(path):
        resolve_weight_path(path)  # a repository missing from the cache is refused here
        section = exported_backbone_section(hub_json(path))
        return {**section, "pretrained": str(path)} if section else {"pretrained": str(path)}
    path = Path(path)
    if path.is_dir():
        raw = load_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
        section = exported_backbone_section(raw)
        if section is None:
            section = read_run_config(path).config.get("backbone")
        if not isinstance(section, dict):
            raise CheckpointError(f"--backbone {path}: its config.json has no 'backbone' section")
        resolve_weight_path(path)
        return {**section, "pretrained": str(path)}
    if not path.is_file():
        raise CheckpointError(f"--backbone {path}: no such run folder or weight file")
    return {"pretrained": str(path)}


# FreMAE's objective.decoder -> the segmentation decoder that takes its blocks
SEGMENTATION_DECODER_OF = {"light": "multistage", "unetr": "unetr"}


def pretrained_decoder_file(path: str | Path) -> Path | None:
    """A pretraining run folder's decoder blocks (``decoder.safetensors``), or None.

    FreMAE runs write it (the light decoder's trunk, or ``objective.decoder: unetr``'s
    UNETR blocks); a weight file given to ``--backbone`` never brings a decoder.
    """
    path = Path(path)
    weight_file = path / DECODER_FILE
    return weight_file if path.is_dir() and weight_file.is_file() else None


def load_pretrained_decoder(decoder: torch.nn.Module, path: str | Path) -> LoadReport | None:
    """Load a pretraining run's decoder blocks into a segmentation decoder that takes them.

    ``path`` is the backbone's ``pretrained`` source. Returns None when the run has no
    decoder blocks, or when ``decoder`` cannot take them (then the log names the decoder
    that can: ``model.decoder: multistage`` for FreMAE's light decoder, ``unetr`` for its
    ``unetr`` decoder). Tensors the run has but the decoder lacks, or of another shape
    (a decoder built with other widths than the run's), are a :class:`CheckpointError`
    naming the run's settings; the decoder's own tensors beyond the run's (the
    classifier; SwinUNETR's ``decoder3``-``decoder1``, ``out``) stay as initialised and
    are logged.
    """
    weight_file = pretrained_decoder_file(path)
    if weight_file is None:
        return None
    objective = read_run_config(path).config.get("objective") or {}
    name = SEGMENTATION_DECODER_OF.get(objective.get("decoder", "light"), "multistage")
    if not getattr(decoder, "takes_pretrained_blocks", False):
        log.info("%s: the run's pretrained decoder blocks are not used by decoder %s "
                 "(set model.decoder: %s to finetune them too)", weight_file, type(decoder).__name__, name)
        return None
    settings = (f"the run's objective.decoder {objective.get('decoder', 'light')!r} (segmentation decoder "
                f"'{name}'), decoder_width {objective.get('decoder_width')}, full_resolution_width "
                f"{objective.get('full_resolution_width')}, image_path {objective.get('image_path', True)}: "
                "set model.decoder and model.decoder_options to match")
    try:
        report = load_state(decoder, load_weights(weight_file), strict=False, source=weight_file, quiet=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {settings}") from None
    if report.unexpected or not report.loaded:
        raise CheckpointError(
            f"{weight_file}: decoder tensors that decoder {type(decoder).__name__} does not have: "
            f"{', '.join(report.unexpected[:5]) or '<none matched>'}; {settings}"
        )
    log.info("%s: %s into the decoder (%s new: %s)", weight_file, report.summary(), len(report.missing),
             ", ".join(sorted({key.split(".", 1)[0] for key in report.missing})))
    return report


def normalize_keys(state: Mapping[str, torch.Tensor], backbone: Backbone) -> StateDict:
    """Bring keys to ours (``model.<timm/MONAI key>``).

    Strips wrapper prefixes that every key carries, keeps only a sub-model's tensors
    when the file holds a larger model, and adds ``model.`` to plain timm/MONAI keys.
    """
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    for prefix in SUBMODEL_PREFIXES:
        inside = {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)}
        if inside:
            others = len(state) - len(inside)
            if others:
                log.info("taking %d tensors under '%s', ignoring %d others",
                         len(inside), prefix, others)
            state = inside
            break
    if not any(key.startswith("model.") for key in state):
        state = {f"model.{key}": value for key, value in state.items()}
    return state


def drop_classifier(state: StateDict, backbone: Backbone) -> StateDict:
    """Remove classifier-head tensors that our headless model does not have."""
    pretrained_cfg = getattr(backbone.model, "pretrained_cfg", None) or {}
    classifiers = pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    prefixes = tuple(f"model.{name}." for name in classifiers)
    if not prefixes:
        return state
    own = backbone.state_dict()
    dropped = [key for key in state if key.startswith(prefixes) and key not in own]
    if dropped:
        log.info("dropping classifier tensors: %s", ", ".join(dropped))
    return {key: value for key, value in state.items() if key not in dropped}


def adapt_conv_in_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``(O, I, *k)`` conv weight -> ``(O, in_chans, *k)`` with timm's ``adapt_input_conv``.

    Channels are repeated (or summed for one channel) and rescaled by ``I / in_chans`` so
    that activations keep their scale. 3D kernels are viewed as 2D for the call.
    """
    from timm.models import adapt_input_conv

    out_chans, source_chans, *kernel = weight.shape
    as_2d = weight.reshape(out_chans, source_chans, -1, 1)
    adapted = adapt_input_conv(in_chans, as_2d, base_chans=source_chans)
    return adapted.reshape(out_chans, in_chans, *kernel)


def adapt_stem(state: StateDict, backbone: Backbone) -> StateDict:
    """Adapt the first conv of a checkpoint made for other input channels (RGB -> M)."""
    key = backbone.stem_weight_key
    if key is None or key not in state:
        return state
    weight = state[key]
    own = backbone.state_dict().get(key)
    if own is None or weight.ndim != own.ndim or weight.shape[1] == backbone.in_chans:
        return state
    if weight.shape[0] != own.shape[0] or weight.shape[2:] != own.shape[2:]:
        return state  # another architecture: load_state names the tensor
    log.info("adapting '%s' from %d to %d input channels", key, weight.shape[1], backbone.in_chans)
    return {**state, key: adapt_conv_in_channels(weight, backbone.in_chans)}


def resample_pos_embed(state: StateDict, backbone: Backbone) -> StateDict:
    """Resample a ViT's absolute position embeddings to our patch grid (e.g. 14x14 -> 4x4)."""
    from timm.layers import resample_abs_pos_embed

    key = "model.pos_embed"
    model = backbone.model
    if backbone.family != "vit" or key not in state or getattr(model, "pos_embed", None) is None:
        return state
    posemb = state[key]
    if posemb.shape == model.pos_embed.shape:
        return state
    num_prefix_tokens = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = list(model.patch_embed.grid_size)
    source_tokens = posemb.shape[1] - num_prefix_tokens
    source_side = int(round(source_tokens**0.5))
    if posemb.ndim != 3 or source_side * source_side != source_tokens:
        return state  # not a square grid: load_state reports the mismatch
    log.info("resampling '%s' from %dx%d to %dx%d", key, source_side, source_side, *grid)
    resampled = resample_abs_pos_embed(
        posemb, new_size=grid, num_prefix_tokens=num_prefix_tokens, verbose=False
    )
    return {**state, key: resampled}


def resize_relative_position_tables(state: StateDict, backbone: Backbone) -> StateDict:
    """Interpolate 2D Swin relative-position bias tables to our (possibly clamped) window."""
    from timm.layers import resize_rel_pos_bias_table

    own = backbone.state_dict()
    modules = dict(backbone.named_modules())
    resized = dict(state)
    for key, table in state.items():
        if not key.endswith("relative_position_bias_table") or key not in own:
            continue
        target = own[key]
        attention = modules.get(key.rsplit(".", 1)[0])
        window = tuple(getattr(attention, "window_size", ()))
        if table.shape == target.shape or table.ndim != 2 or len(window) != 2:
            continue
        if table.shape[1] != target.shape[1]:
            continue  # other head count: load_state names the tensor
        resized[key] = resize_rel_pos_bias_table(
            table, new_window_size=window, new_bias_shape=tuple(target.shape)
        )
    return resized


def keep_own_derived_buffers(state: StateDict, backbone: Backbone) -> StateDict:
    """Index tables and masks follow from the architecture: keep ours, not the file's."""
    own = backbone.state_dict()
    return {
        key: own[key] if key.endswith(DERIVED_BUFFER_SUFFIXES) and key in own else value
        for key, value in state.items()
    }


STATE_FILTERS: tuple[Callable[[StateDict, Backbone], StateDict], ...] = (
    normalize_keys,
    drop_classifier,
    adapt_stem,
    resample_pos_embed,
    resize_relative_position_tables,
    keep_own_derived_buffers,
)


def adapt_state_dict(state: Mapping[str, torch.Tensor], backbone: Backbone) -> StateDict:
    """Run :data:`STATE_FILTERS` over ``state`` so that it fits ``backbone``."""
    adapted = dict(state)
    for state_filter in STATE_FILTERS:
        adapted = state_filter(adapted, backbone)
    return adapted


def load_pretrained(backbone: Backbone, path: str | Path) -> LoadReport:
    """Load local weights (file or run folder) into ``backbone`` after adapting them.

    Missing and unexpected keys are logged and returned; a tensor whose shape still
    differs, or a file of which nothing matches, is a :class:`CheckpointError`.
    """
    weight_file = resolve_weight_path(path)
    source = f"{path} ({weight_file})" if is_hub_spec(path) else weight_file
    state = adapt_state_dict(load_weights(weight_file), backbone)
    report = load_state(backbone, state, strict=False, source=source)
    learned = {name for name, _ in backbone.named_parameters()}
    if not learned.intersection(report.loaded):  # nothing, or only buffers: it would train from random weights
        raise CheckpointError(
            f"{source}: no tensor matches backbone '{type(backbone.model).__name__}' (none of its weights; first key in file: "
            f"'{next(iter(state), '<none>')}', the backbone's: '{next(iter(backbone.state_dict()), '<none>')}'); "
            "is it a file of another architecture or tool?"
        )
    if report.missing:
        log.warning(
            "%s: %d backbone tensors not in the file, left as initialised (first: %s)",
            source, len(report.missing), ", ".join(report.missing[:5]),
        )
    if report.unexpected:
        log.warning(
            "%s: %d tensors in the file not used by the backbone (first: %s)",
            source, len(report.unexpected), ", ".join(report.unexpected[:5]),
        )
    return report


__all__ = [
    "STATE_FILTERS",
    "adapt_conv_in_channels",
    "adapt_stem",
    "adapt_state_dict",
    "drop_classifier",
    "exported_backbone_section",
    "keep_own_derived_buffers",
    "load_pretrained",
    "load_pretrained_decoder",
    "pretrained_decoder_file",
    "normalize_keys",
    "pretrained_section",
    "resample_pos_embed",
    "resize_relative_position_tables",
    "resolve_weight_path",
]
