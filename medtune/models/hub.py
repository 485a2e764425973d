"""Weights from the local Hugging Face Hub cache: ``hf-hub:ORG/NAME[@REVISION]``.

Wherever medtune takes a weight file (``backbone.pretrained``, ``--backbone``, CLIP and
text-tower weights) it also takes ``hf-hub:ORG/NAME``: a timm repository (``config.json``
+ ``model.safetensors``, e.g. a ``medtune export --format hub`` folder someone uploaded)
or an open_clip one (``open_clip_config.json`` + ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, e.g. BiomedCLIP, whose timm image tower loads as a
medtune backbone). The files are read from the Hub cache (``HF_HOME``, default
``~/.cache/huggingface``) only: nothing is downloaded at run time, exactly as with
``HF_HUB_OFFLINE=1``. ``medtune finetune|pretrain --allow-download`` fetches the
repositories a config names before the run starts (:func:`fetch_hub_specs`); otherwise
a repository missing from the cache is a :class:`CheckpointError` that says how to get it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from medtune.checkpoints.runs import CONFIG_FILE, MODEL_FILE
from medtune.errors import CheckpointError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# weight files of a repository, in the order they are looked for (timm, open_clip; safetensors first)
WEIGHT_FILES = (MODEL_FILE, "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
# what --allow-download fetches of a repository: configs and weights, not every file
FETCHED_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.txt")


def is_hub_spec(value: Any) -> bool:
    return isinstance(value, (str, Path)) and str(value).startswith(HUB_PREFIX)


def split_hub_spec(spec: str | Path) -> tuple[str, str | None]:
    """``hf-hub:org/name@rev`` -> ``("org/name", "rev")`` (revision None: ``main``)."""
    repo = str(spec)[len(HUB_PREFIX):]
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{spec}: a Hub repository is hf-hub:ORG/NAME[@REVISION]")
    return repo, revision or None


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_hub_file(spec: str | Path, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` that the local cache holds for ``spec``, or None. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = split_hub_spec(spec)
    for name in filenames:
        found = try_to_load_from_cache(repo, name, cache_dir=hub_cache_dir(), revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _not_cached(spec: str | Path, what: str) -> CheckpointError:
    repo, _ = split_hub_spec(spec)
    return CheckpointError(
        f"{spec}: {what} not in the local Hugging Face cache ({hub_cache_dir()}); medtune never downloads at run "
        f"time: pass --allow-download, or fetch it first (huggingface-cli download {repo})"
    )


def hub_weight_file(spec: str | Path) -> Path:
    """The weight file of a cached repository (:data:`WEIGHT_FILES`, first found)."""
    found = cached_hub_file(spec, WEIGHT_FILES)
    if found is None:
        raise _not_cached(spec, f"no weights ({', '.join(WEIGHT_FILES)})")
    return found


def hub_json(spec: str | Path, filename: str = CONFIG_FILE, required: bool = False) -> dict[str, Any] | None:
    """A cached repository's JSON file (``config.json``), or None when the cache has none."""
    found = cached_hub_file(spec, [filename])
    if found is None:
        if required:
            raise _not_cached(spec, filename)
        return None
    try:
        data = json.loads(found.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{spec}: {filename} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def hub_specs(tree: Any) -> Iterator[str]:
    """Every ``hf-hub:`` string inside a config mapping."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from hub_specs(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from hub_specs(value)
    elif is_hub_spec(tree):
        yield str(tree)


def fetch_hub_specs(config: Any) -> list[str]:
    """Download into the cache every ``hf-hub:`` repository ``config`` names (``--allow-download``)."""
    from huggingface_hub import snapshot_download

    fetched = []
    for spec in dict.fromkeys(hub_specs(config)):
        repo, revision = split_hub_spec(spec)
        try:
            snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=list(FETCHED_PATTERNS))
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one line naming the repo
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{spec}: cannot download ({first})") from None
        log.info("fetched %s into %s", spec, hub_cache_dir())
        fetched.append(spec)
    return fetched


__all__ = [
    "FETCHED_PATTERNS", "HUB_PREFIX", "OPEN_CLIP_CONFIG_FILE", "WEIGHT_FILES", "cached_hub_file", "fetch_hub_specs",
    "hub_cache_dir", "hub_json", "hub_specs", "hub_weight_file", "is_hub_spec", "split_hub_spec",
]
