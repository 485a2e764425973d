"""The run folder: its file names and its rules, in one place.

Every medtune training command (pretraining and every finetuning task) writes one run
folder; every command that reads one (predict, evaluate, export, ``--backbone``) reads
it through this module::

    RUN/
      config.json                 {"task": ..., <the run's config>, "derived": {...}}
      backbone.safetensors        pretraining: the encoder; finetuning: the base backbone before adapters
      pretrain.safetensors        pretraining: encoder + decoder (the whole objective)
      decoder.safetensors         pretraining with a transferable decoder (FreMAE): the decoder blocks a
                                  segmenter takes over (decoder 'multistage' for FreMAE's light decoder,
                                  'unetr' for its 'unetr' decoder, in MONAI SwinUNETR names)
      model.safetensors           finetuning: the whole model (last step)
      adapter.json                adapter methods: the adapter's config + the base weights' path and sha256
      adapter.safetensors         adapter methods: the trained backbone tensors only (backbone names)
      head.safetensors            adapter methods: every model tensor outside the backbone (task head)
      best/                       the same weight files at the best evaluation + summary.json
      summary.json                evaluations: {"final", "best", "best_step", ...}
      metrics.jsonl               one JSON line per logged step
      splits_final.json           finetuning: the folds the run chose from (nnU-Net's format)
      state/step_NNNNNNN/         resumable Accelerate states
      reconstruction.png          pretraining figure

Exports (``medtune export``) add the names other tools expect: ``adapter_config.json`` +
``adapter_model.safetensors`` (a peft LoRA folder), ``model.safetensors`` + ``config.json``
in timm's or MONAI's key names (``--format timm|monai``), ``README.md`` (the Hub model
card), ``model.onnx``, and in a Hub export of an adapter ``base/`` (its base backbone as a
timm/MONAI export).

Rules:

- A folder *holds a run* when it has trained weights (:data:`RUN_MARKERS`) or saved
  state: a fresh run refuses it, ``--resume`` continues it.
- A run folder's name is chosen once (rank 0) and shared with every rank, and the main
  process holds an exclusive OS lock on it (``run.lock``) while the run lives
  (:func:`open_run`): a second run on the folder, fresh or ``--resume``, is refused
  naming the holder. The OS drops the lock of a process that dies.
- A resume that changes a key defining the model (:data:`MODEL_KEYS`) is refused naming
  the key; other changes (steps, learning rate, logging) are logged.
- Which weights to read: ``"best"`` (the best evaluation, when the run kept one; else
  the last step) by default everywhere, or ``"last"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from medtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BACKBONE_FILE = "backbone.safetensors"
PRETRAIN_FILE = "pretrain.safetensors"
DECODER_FILE = "decoder.safetensors"
MODEL_FILE = "model.safetensors"
ADAPTER_CONFIG_FILE = "adapter.json"
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"
BEST_DIR = "best"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
STATE_DIR = "state"
TRAINER_STATE_FILE = "trainer_state.json"
FIGURE_FILE = "reconstruction.png"
LOCK_FILE = "run.lock"
SPLITS_FILE = "splits_final.json"  # the folds a run chose from (nnU-Net's format)
RUN_FILES = (SPLITS_FILE,)  # JSON files a task may add to its run folder (TaskData.files)
# names other tools read (exports only): peft's adapter folder, the Hub's model card, ONNX
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CARD_FILE = "README.md"
ONNX_FILE = "model.onnx"
BASE_DIR = "base"  # Hub exports of adapters: the base backbone in timm's or MONAI's names

DEFAULT_PARENT = Path("checkpoints")
CHECKPOINTS = ("best", "last")
DEFAULT_CHECKPOINT = "best"
PRETRAIN_TASK = "pretrain"  # the "task" of a pretraining run's config.json

# what makes a folder "hold a run" that a fresh run must not overwrite. A run that failed
# before its first save left only config.json, metrics.jsonl (and a finetuning run's base
# backbone.safetensors), which a new run replaces.
RUN_MARKERS = (MODEL_FILE, PRETRAIN_FILE, ADAPTER_WEIGHTS_FILE, BEST_DIR, STATE_DIR)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


# --------------------------------------------------------------------------- starting a run


def held_run(folder: str | Path) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``folder`` (empty: no run to protect)."""
    folder = Path(folder)
    return [name for name in RUN_MARKERS if (folder / name).exists()]


def check_run_dir(folder: str | Path, resume: str | Path | None) -> None:
    """A fresh run refuses a folder that holds a run; ``--resume latest`` needs its state.

    (Another ``--resume`` folder is checked when its state is loaded.)
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"run folder {folder} is a file")
    held = held_run(folder)
    if resume is None and held:
        raise CheckpointError(
            f"run folder {folder} already holds a run ({', '.join(held)}); "
            f"continue it with --resume latest or choose another --output"
        )
    if str(resume) in ("latest", "latest-valid") and find_latest_state(folder) is None:
        raise CheckpointError(f"run folder {folder} has no saved state to resume ({STATE_DIR}/ is missing or empty)")
    if resume is not None:
        resolve_resume(resume, folder)  # a damaged state is refused before anything is written


def choose_run_dir(output: str | Path | None, stem: str, resume: str | Path | None = None,
                   parent: str | Path = DEFAULT_PARENT) -> Path:
    """``output``; else the run that ``resume`` names; else ``parent/<stem>-<YYYYmmdd-HHMMSS>``.

    ``resume="latest"`` without ``output`` picks the newest ``parent/<stem>-*`` run
    with saved state.
    """
    if output is not None:
        return Path(output)
    parent = Path(parent)
    if str(resume) in ("latest", "latest-valid"):
        candidates = sorted(
            (p for p in parent.glob(f"{stem}-*") if (p / STATE_DIR).is_dir()), key=lambda p: p.stat().st_mtime
        )
        if not candidates:
            raise CheckpointError(
                f"--resume latest: no run of '{stem}' with saved state under {parent}/ (pass --output RUN_DIR)"
            )
        return candidates[-1]
    if resume is not None:
        path = Path(resume)
        return path.parent.parent if path.parent.name == STATE_DIR else path  # a state/step_N folder
    return parent / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def open_run(processes: Any, output: str | Path | None, stem: str, resume: str | Path | None = None,
             run_config: RunConfig | None = None) -> Iterator[Path]:
    """The run folder of a training command, for the run's lifetime.

    Chosen on rank 0 (:func:`choose_run_dir`), checked (:func:`check_run_dir`; a resume
    also against ``run_config``, :func:`check_resume`) before anything is written, locked
    there (:class:`RunLock`) and shared with every rank; on exit the lock is released
    (and a folder left empty removed).
    """
    from medtune.distributed import agree

    from medtune.checkpoints.lock import FileLock

    locked: list[tuple[Path, FileLock]] = []

    def decide() -> Path:
        folder = choose_run_dir(output, stem, resume)
        check_run_dir(folder, resume)  # before the lock: a refused run leaves the folder untouched
        if resume is not None and run_config is not None:
            check_resume(folder, run_config)
        lock = FileLock(folder / LOCK_FILE)
        if not lock.acquire(blocking=False):
            raise CheckpointError(
                f"run folder {folder} is in use by another run ({lock.holder()}); "
                "wait for it to end or choose another --output"
            )
        locked.append((folder, lock))
        check_run_dir(folder, resume)  # again under the lock: another run may have started meanwhile
        return folder

    try:
        yield agree(processes, decide)
    finally:
        for folder, lock in locked:
            lock.release()
            _remove_if_only_the_lock(folder)


def _remove_if_only_the_lock(folder: Path) -> None:
    """A run that stopped before writing anything leaves no folder behind."""
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass


# which config keys define the model a run's state holds: a resume may not change them
MODEL_KEYS = (
    "backbone", "adapter", "model", "loss", "objective", "text", "data.mode", "data.img_size", "data.crop_size",
    "data.modalities", "data.label_values", "data.slice_axis", "data.spacing", "data.normalization",
)
# where the initial weights came from: the saved state holds every weight, so these may differ
INITIAL_WEIGHT_KEYS = ("backbone.pretrained", "model.clip_weights", "text.weights", "text.path")


def check_resume_config(saved: Mapping[str, Any], new: Mapping[str, Any], source: str | Path) -> list[str]:
    """Compare a resumed run's new config with its saved one (``config.json``).

    A changed key under :data:`MODEL_KEYS` is a :class:`ConfigError` naming it (the
    saved state would not fit, or would silently mean another model); the other changed
    keys are returned (and logged by the caller).
    """
    before, after = _flatten(saved), _flatten(new)
    changed = sorted(
        k for k in set(before) | set(after)
        if before.get(k) != after.get(k)
        and not (after.get(k) is None and k in before)  # left to the data again: resolved as before
        and k not in INITIAL_WEIGHT_KEYS
    )
    defining = [k for k in changed if any(k == key or k.startswith(key + ".") for key in MODEL_KEYS)]
    if defining:
        key = defining[0]
        raise ConfigError(
            f"--resume changes {key} ({before.get(key)!r} -> {after.get(key)!r}), which defines the model saved in "
            f"{source}; start a new run (another --output) to train another model"
        )
    return changed


def check_resume(folder: str | Path, run_config: RunConfig) -> None:
    """Before a resume writes anything: the run in ``folder`` must be of the same task and
    model as ``run_config`` (:func:`check_resume_config`); other changes are logged."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        return
    saved = read_run_config(folder)
    if saved.task != run_config.task:
        raise ConfigError(f"--resume: {folder} is a '{saved.task}' run, not '{run_config.task}'")
    changed = check_resume_config(saved.config, run_config.config, folder / CONFIG_FILE)
    if changed:
        log.warning("resuming with a changed config: %s", ", ".join(changed))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


# --------------------------------------------------------------------------- config.json


@dataclass
class RunConfig:
    """``config.json`` of a run: the task, the run's config mapping and derived facts
    (values read from the data at training time: label values, answer vocabulary, ...)."""

    task: str
    config: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, **self.config, "derived": self.derived}

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> "RunConfig":
        if not isinstance(data, Mapping) or not isinstance(data.get("task"), str):
            raise CheckpointError(f"{source}: not a medtune run config (no 'task')")
        config = {k: v for k, v in data.items() if k not in ("task", "derived")}
        derived = data.get("derived") or {}
        if not isinstance(derived, Mapping):
            raise CheckpointError(f"{source}: 'derived' must be a mapping")
        return cls(task=data["task"], config=config, derived=dict(derived))


def write_run_config(folder: str | Path, run_config: RunConfig) -> Path:
    from medtune.checkpoints.io import save_json

    return save_json(run_config.to_json(), Path(folder) / CONFIG_FILE)


def read_run_config(folder: str | Path) -> RunConfig:
    """``folder/config.json`` as a :class:`RunConfig` (:class:`CheckpointError` if absent or foreign)."""
    from medtune.checkpoints.io import load_json

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"run folder not found: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not a medtune run or export folder)")
    return RunConfig.from_json(load_json(path), path)


# --------------------------------------------------------------------------- reading weights


def weights_dir(folder: str | Path, which: str = DEFAULT_CHECKPOINT) -> Path:
    """Where the weights of ``which`` checkpoint are: ``best/`` if asked for and kept, else the folder."""
    if which not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got '{which}'")
    folder = Path(folder)
    best = folder / BEST_DIR
    if which == "best" and any((best / name).is_file() for name in (MODEL_FILE, ADAPTER_WEIGHTS_FILE)):
        return best
    return folder


def write_run_files(folder: str | Path, files: Mapping[str, Any]) -> list[Path]:
    """The task's JSON files beside ``config.json``; only names of :data:`RUN_FILES`."""
    from medtune.checkpoints.io import save_json

    written = []
    for name, content in files.items():
        if name not in RUN_FILES:
            raise ConfigError(f"'{name}' is not a run-folder file (known: {', '.join(RUN_FILES)})")
        written.append(save_json(content, Path(folder) / name))
    return written


def write_summary(folder: str | Path, summary: Mapping[str, Any]) -> Path:
    """``folder/summary.json``: an evaluation summary (the same file name for every task)."""
    from medtune.checkpoints.io import save_json

    return save_json(dict(summary), Path(folder) / SUMMARY_FILE)


def read_summary(folder: str | Path) -> dict[str, Any]:
    """``folder/summary.json`` (empty when the run wrote none, e.g. pretraining)."""
    from medtune.checkpoints.io import load_json

    path = Path(folder) / SUMMARY_FILE
    summary = load_json(path) if path.is_file() else {}
    return dict(summary) if isinstance(summary, Mapping) else {}


# --------------------------------------------------------------------------- resumable state


def state_root(folder: str | Path) -> Path:
    return Path(folder) / STATE_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_step_dir(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name))


def find_latest_state(path: str | Path) -> Path | None:
    """The newest complete ``step_NNNNNNN`` state under ``path`` or ``path/state``."""
    states = saved_states(path)
    return states[0] if states else None


def saved_states(path: str | Path) -> list[Path]:
    """The complete ``step_NNNNNNN`` states under ``path`` or ``path/state``, newest first."""
    path = Path(path)
    root = path / STATE_DIR if (path / STATE_DIR).is_dir() else path
    if not root.is_dir():
        return []
    done = [
        (int(m.group(1)), d)
        for d in root.iterdir()
        if (m := _STEP_DIR.match(d.name)) and (d / TRAINER_STATE_FILE).is_file()
    ]
    return [d for _, d in sorted(done, reverse=True)]


def state_problem(step_dir: Path) -> str | None:
    """Why a saved state cannot be resumed (a truncated or garbled file, named), or None.

    Reads the safetensors headers, checks the archives' CRCs (``torch.save`` files are
    zip archives) and parses the trainer state: cheap next to training.
    """
    import zipfile

    from medtune.checkpoints.io import check_safetensors

    try:
        json.loads((step_dir / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{step_dir / TRAINER_STATE_FILE}: unreadable ({exc})"
    for path in sorted(step_dir.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                check_safetensors(path)
            elif path.suffix in (".bin", ".pt", ".pth") and zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        return f"{path}: a damaged archive member"
            elif path.suffix in (".bin", ".pt", ".pth") and path.stat().st_size == 0:
                return f"{path}: empty file"
        except CheckpointError as exc:
            return str(exc)
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{path}: unreadable ({exc})"
    return None


def resolve_resume(resume: str | Path, folder: str | Path) -> Path:
    """The state folder ``--resume`` names, checked for damaged files.

    ``latest`` (the newest state of ``folder``), ``latest-valid`` (the newest one whose
    files are whole, skipping damaged ones with a warning), a run folder (its newest
    state) or a ``state/step_NNNNNNN`` folder.
    """
    mode = str(resume)
    if mode in ("latest", "latest-valid"):
        states = saved_states(folder)
        where = state_root(folder)
    else:
        path = Path(resume)
        states = [path] if (path / TRAINER_STATE_FILE).is_file() else saved_states(path)
        where = path
    if not states:
        raise CheckpointError(f"{where}: no saved state to resume from (expected {STATE_DIR}/step_NNNNNNN)")
    for number, state in enumerate(states):
        problem = state_problem(state)
        if problem is None:
            return state
        older = states[number + 1:]
        if mode != "latest-valid":
            hint = (f"; resume from the previous one with --resume latest-valid (or --resume {older[0]})"
                    if older else "; no older state to fall back to")
            raise CheckpointError(f"cannot resume: {problem}{hint}")
        log.warning("skipping damaged state %s: %s", state, problem)
    raise CheckpointError(f"{where}: every saved state is damaged (newest: {state_problem(states[0])})")


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The records of ``folder/metrics.jsonl`` (empty if there is none)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "BACKBONE_FILE", "BASE_DIR", "BEST_DIR", "CHECKPOINTS",
    "CONFIG_FILE", "DECODER_FILE", "DEFAULT_CHECKPOINT", "FIGURE_FILE", "HEAD_FILE", "LOCK_FILE", "METRICS_FILE",
    "MODEL_CARD_FILE", "MODEL_FILE", "MODEL_KEYS", "ONNX_FILE", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE",
    "PRETRAIN_FILE", "PRETRAIN_TASK", "RUN_FILES", "RUN_MARKERS", "RunConfig", "SPLITS_FILE", "STATE_DIR",
    "SUMMARY_FILE", "TRAINER_STATE_FILE", "check_resume", "check_resume_config", "check_run_dir", "choose_run_dir",
    "find_latest_state", "held_run", "open_run", "read_metrics", "read_run_config", "read_summary", "resolve_resume",
    "saved_states", "state_problem", "step_dir_name", "weights_dir", "write_run_config", "write_run_files",
    "write_summary",
]
