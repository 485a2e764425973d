"""Hugging Face Hub folders: the model card of an export, and uploading it.

``medtune export RUN --format hub --out DIR`` writes the files of the run's export
(:mod:`medtune.checkpoints.export`) and a ``README.md`` model card generated from the run:
what the weights are (method, backbone, input), the data, the training (steps, batch,
learning rate), the metrics, a parameter table, the files, and how to load them with
medtune and with timm, peft or MONAI. ``huggingface_hub`` uploads the folder as is;
``--push-to-hub REPO_ID`` does it (:func:`push_folder`) when ``huggingface_hub`` is
installed and a token is set (``HF_TOKEN`` or ``huggingface-cli login``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from medtune.checkpoints.io import atomic_write
from medtune.checkpoints.runs import (
    BASE_DIR,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    PEFT_CONFIG_FILE,
    PRETRAIN_TASK,
    read_metrics,
    read_summary,
)
from medtune.errors import ConfigError

if TYPE_CHECKING:
    from medtune.checkpoints.export import Source

log = logging.getLogger(__name__)

REPO_PLACEHOLDER = "ORG/NAME"


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {json.dumps(value) if isinstance(value, (dict, list, tuple)) else value} |"
              for key, value in rows]
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def data_rows(config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What the card says about the data: the dataset folder's name (never its path) and layout."""
    data = config.get("data") or {}
    rows: list[tuple[str, Any]] = []
    if data.get("root"):
        rows.append(("dataset", f"`{Path(str(data['root'])).name}`"))
    for key in ("layout", "mode", "modalities", "img_size", "crop_size", "val_fraction"):
        if data.get(key) not in (None, "", []):
            rows.append((key, data[key]))
    return rows


def training_rows(config: Mapping[str, Any], steps: int | None) -> list[tuple[str, Any]]:
    train = config.get("train") or {}
    optim = train.get("optim") or {}
    rows = [("steps", _number(steps)) if steps is not None else ("steps (planned)", _number(train.get("max_steps")))]
    for key, value in (("batch size (per process)", train.get("batch_size")), ("optimizer", optim.get("name")),
                       ("learning rate", optim.get("lr")), ("seed", train.get("seed"))):
        if value is not None:
            rows.append((key, _number(value)))
    return rows


def metric_rows(folder: Path, task: str) -> list[tuple[str, Any]]:
    """The run's evaluation (``summary.json``: best and final), or its last logged loss."""
    summary = read_summary(folder)
    rows = []
    for which in ("best", "final"):
        for key, value in sorted((summary.get(which) or {}).items()):
            if isinstance(value, (int, float)):
                rows.append((f"{which} {key}", _number(value)))
    if summary.get("best_step") is not None:
        rows.append(("best step", summary["best_step"]))
    if not rows:
        logged = [r for r in read_metrics(folder) if isinstance(r.get("loss"), (int, float))]
        if logged:
            rows.append((f"{'pretraining' if task == PRETRAIN_TASK else 'training'} loss at step {logged[-1].get('step')}",
                         _number(logged[-1]["loss"])))
    return rows


def steps_of(folder: Path) -> int | None:
    summary = read_summary(folder)
    if isinstance(summary.get("steps"), int):
        return summary["steps"]
    steps = [r["step"] for r in read_metrics(folder) if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


def parameter_rows(source: Source) -> list[tuple[str, Any]]:
    from medtune.checkpoints.counting import count_parameters

    if source.loaded is None:
        total, _ = count_parameters(source.encoder.backbone)
        return [("backbone parameters", _number(total))]
    from medtune.adapters import describe

    described = describe(source.loaded.model)
    rows = [("total", _number(described["total"])), ("trained", _number(described["trainable"])),
            ("trained %", f"{described['trainable_percent']:.2f}")]
    if described["method"] is not None:
        rows += [(f"trained: {group}", _number(n)) for group, n in described["groups"].items()]
    return rows


def file_rows(folder: Path) -> list[tuple[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MODEL_CARD_FILE)
    return [(f"`{p.relative_to(folder)}`", f"{p.stat().st_size / 1e6:.2f} MB") for p in files]


# --------------------------------------------------------------------------- how to load


def backbone_usage(section: Mapping[str, Any], fmt: str, repo: str, path: str = "") -> str:
    """Loading a timm/MONAI backbone export (at ``path`` inside the repository)."""
    if fmt == "monai":
        weights = f"{path}/{MODEL_FILE}" if path else MODEL_FILE
        config = f"{path}/{CONFIG_FILE}" if path else CONFIG_FILE
        return f'''```python
import json
from huggingface_hub import hf_hub_download
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file

kwargs = json.load(open(hf_hub_download("{repo}", "{config}")))["kwargs"]
net = SwinUNETR(**kwargs, out_channels=4)        # out_channels: your classes
net.swinViT.load_state_dict(load_file(hf_hub_download("{repo}", "{weights}")), strict=True)
```'''
    source = f'f"local-dir:{{snapshot_download(\'{repo}\')}}/{path}"' if path else f'"hf-hub:{repo}"'
    prefix = "from huggingface_hub import snapshot_download\n" if path else ""
    return f'''```python
import timm
{prefix}model = timm.create_model({source}, pretrained=True)   # {section['name']}, in_chans {section['in_chans']}, img_size {section['img_size']}
features = model.forward_features(x)   # x: (B, {section['in_chans']}, {section['img_size']}, {section['img_size']}) z-scored modalities
```'''


def usage(source: Source, folder: Path, repo: str) -> str:
    """The card's "How to load" section."""
    if source.loaded is None:
        section, fmt = source.encoder.section, source.encoder.format
        return "\n\n".join([
            f"With {'MONAI' if fmt == 'monai' else 'timm'}:", backbone_usage(section, fmt, repo),
            "With medtune, as the backbone of a finetuning run (read from the local Hugging Face cache; "
            "`--allow-download` fetches it):",
            f"```bash\nmedtune finetune --config configs/medtuning_vit_b16_brats.yaml --data DATA --backbone hf-hub:{repo}\n```",
        ])
    parts = [
        "With medtune (the whole model):",
        f'''```python
from huggingface_hub import snapshot_download
from medtune.finetune import load_trained

loaded = load_trained(snapshot_download("{repo}"))   # loaded.model: the {source.loaded.task.name} model, eval mode
```''',
    ]
    if (folder / BASE_DIR).is_dir():
        from medtune.checkpoints.interop import FAMILY_FORMAT, backbone_section, find_backbone

        backbone = find_backbone(source.loaded.model)
        section, fmt = backbone_section(backbone), FAMILY_FORMAT.get(backbone.family, "timm")
        parts += [f"The base backbone alone (`{BASE_DIR}/`):", backbone_usage(section, fmt, repo, BASE_DIR)]
    if (folder / PEFT_CONFIG_FILE).is_file():
        parts += ["The LoRA adapter with peft, on that base:", f'''```python
from peft import PeftModel

model = PeftModel.from_pretrained(model, "{repo}")   # the timm base above + LoRA
```''']
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- the card


def model_card(source: Source, folder: Path, repo: str | None = None) -> str:
    """The ``README.md`` of a Hub export of ``source`` written into ``folder``."""
    repo = repo or REPO_PLACEHOLDER
    config = source.run_config.config
    task = source.run_config.task
    if source.loaded is None:
        section = source.encoder.section
        method = (config.get("objective") or {}).get("name", "pretraining")
        library, what = ("timm" if source.encoder.format == "timm" else "monai"), f"pretrained with {method}"
        method_rows = [("objective", method)] + [
            (k, v) for k, v in (config.get("objective") or {}).items() if k != "name" and not isinstance(v, dict)]
    else:
        from medtune.checkpoints.interop import backbone_section, find_backbone
        from medtune.adapters import find_adapted

        backbone = find_backbone(source.loaded.model)
        section = backbone_section(backbone) if backbone is not None else config.get("backbone") or {}
        found = find_adapted(source.loaded.model)
        method = found[2].config.method if found else "full"
        library = "peft" if (folder / PEFT_CONFIG_FILE).is_file() else "medtune"
        what = f"finetuned for {task} with {method}"
        method_rows = [("task", task), ("method", method)] + [
            (k, v) for k, v in (config.get("adapter") or {}).items() if k != "method"]
    name = source.folder.resolve().name
    backbone_rows = [(k, section[k]) for k in ("name", "in_chans", "img_size", "spatial_dims") if k in section]
    if section.get("options"):
        backbone_rows.append(("options", section["options"]))
    tags = ", ".join(["medtune", "medical-imaging", task, method])
    sections = [
        f"---\nlibrary_name: {library}\ntags: [{tags}]\n---",
        f"# {name}",
        (f"A `{section['name']}` backbone {what}" if section.get("name") else f"A model {what}")
        + f", exported by medtune from the run `{name}`.",
        "## Method\n\n" + _table(method_rows + backbone_rows),
        "## Data\n\n" + (_table(data_rows(config)) if data_rows(config) else "Not recorded."),
        "## Training\n\n" + _table(training_rows(config, steps_of(source.folder))),
        "## Results\n\n" + (_table(metric_rows(source.folder, task)) if metric_rows(source.folder, task)
                            else "No evaluation recorded."),
        "## Parameters\n\n" + _table(parameter_rows(source), ("", "elements")),
        "## Files\n\n" + _table(file_rows(folder), ("file", "size")),
        "## How to load\n\n" + usage(source, folder, repo),
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(source: Source, folder: Path, repo: str | None = None) -> Path:
    text = model_card(source, folder, repo)
    return atomic_write(folder / MODEL_CARD_FILE, lambda tmp: tmp.write_text(text))


# --------------------------------------------------------------------------- uploading


def check_can_push(repo_id: str) -> None:
    """Refuse ``--push-to-hub`` before anything is written: no ``huggingface_hub``, no token, a bad id."""
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError("--push-to-hub needs huggingface_hub (pip install 'medtune[deploy]')") from None
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--push-to-hub {repo_id}: a Hub repository id is ORG/NAME")
    if not huggingface_hub.get_token():
        raise ConfigError("--push-to-hub: no Hugging Face token (set HF_TOKEN or run `huggingface-cli login`)")


def push_folder(folder: Path, repo_id: str) -> str:
    """Create ``repo_id`` (a private model repository when new) and upload ``folder`` as is."""
    from huggingface_hub import HfApi

    check_can_push(repo_id)
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message="medtune export")
    log.info("uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return str(getattr(commit, "commit_url", commit))


__all__ = ["check_can_push", "model_card", "push_folder", "write_model_card"]
