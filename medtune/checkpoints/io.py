"""Safe weight files: atomic safetensors/JSON writes and checked loading.

Every weight file medtune writes is safetensors, written to a temporary file in the
target folder, fsynced, then renamed over the target, so a crash never leaves a
half-written file and never damages the file that was there before. Pickles are read
only from a ``.pt``/``.pth`` path the user names, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medtune.errors import CheckpointError

log = logging.getLogger(__name__)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it onto ``path``.

    The file gets the permissions of any new file under the process's umask (0644 under
    022), not the private 0600 of ``mkstemp``: weights and configs are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temporary(path)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) leave it 0600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file beside ``path`` and the mode the umask gives new files (read
    back from the file itself: the umask cannot be read without changing it)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def refuse_existing(paths: Iterable[str | Path], overwrite: bool = False, what: str = "prediction") -> None:
    """Refuse to write over files that exist (unless ``overwrite``), naming the first one,
    before anything is written."""
    if overwrite:
        return
    for path in map(Path, paths):
        if path.is_dir():
            raise CheckpointError(f"{what} {path} is a folder; choose another --output")
        if path.exists():
            raise CheckpointError(
                f"{what} {path} already exists; medtune never overwrites: choose another --output or pass --overwrite"
            )


def save_json(obj: Any, path: str | Path) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` atomically; shared or non-contiguous storage is copied first."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=meta or None))


def check_safetensors(path: str | Path) -> None:
    """Refuse a safetensors file that is truncated or garbled (its header does not cover
    the file), naming it; reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a complete safetensors file ({first})") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file by its suffix: .safetensors, .pt/.pth (weights only), .npz."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return load_file(str(path))
        if suffix in (".pt", ".pth", ".bin"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "module"):
                if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                    obj = obj[key]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{path}: holds no state dict")
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if suffix == ".npz":
            import numpy as np

            with np.load(str(path)) as archive:
                return {k: torch.from_numpy(archive[k]) for k in archive.files}
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not a plain weights file (it pickles more than tensors, which medtune never "
            "executes); give a .safetensors file, or a .pt/.pth state dict of tensors only"
        ) from None
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read weights ({first})") from None
    raise CheckpointError(f"{path}: unknown weight format '{suffix}' (use .safetensors, .pt, .pth, .npz)")


@dataclass
class LoadReport:
    """What :func:`load_state` matched; ``missing`` and ``unexpected`` are key names."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected"
        )


def load_state(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str | Path = "<state>",
    quiet: bool = False,
) -> LoadReport:
    """Load ``state`` into ``module``; a shape mismatch is always an error naming the tensor.

    With ``strict`` any missing or unexpected key is an error too; without it they are
    reported (logged and returned) so the caller can decide. ``quiet``: the caller logs
    its own summary (a partial state whose "missing" tensors come from elsewhere).
    """
    own = module.state_dict()
    report = LoadReport()
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
            continue
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[name].shape)} (checkpoint of another architecture?)"
            )
        report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    if strict and (report.missing or report.unexpected):
        parts = []
        if report.missing:
            parts.append(f"missing {len(report.missing)} keys (first: '{report.missing[0]}')")
        if report.unexpected:
            parts.append(f"unexpected {len(report.unexpected)} keys (first: '{report.unexpected[0]}')")
        raise CheckpointError(f"{source}: {'; '.join(parts)} (checkpoint of another architecture?)")
    module.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    if not quiet:
        log.info("%s: %s", source, report.summary())
    return report


def load_trained_state(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    expected: Iterable[str],
    *,
    source: str | Path = "<state>",
    what: str = "trained tensor",
) -> LoadReport:
    """Load a partial state that must hold exactly the ``expected`` keys of ``module``
    (an adapter file: the trained tensors only, the frozen rest comes from elsewhere).

    A key outside ``expected``, a missing expected key or a shape mismatch is a
    :class:`CheckpointError` naming the tensor (an adapter of another backbone or method).
    """
    expected = list(expected)
    wanted = set(expected)
    for name in state:
        if name not in wanted:
            raise CheckpointError(
                f"{source}: tensor '{name}' is not a {what} of this model (adapter of another backbone or method?)"
            )
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} {what}s (first: '{missing[0]}')")
    report = load_state(module, state, strict=False, source=source, quiet=True)
    log.info("%s: loaded %d %ss", source, len(report.loaded), what)
    return report

