"""Exclusive OS file locks: one idea for the run folder's ``run.lock`` and the cache's case locks.

``fcntl.flock`` on a lock file: the kernel drops the lock when its holder's descriptor
closes, including when the holder dies (``kill -9``), so a lock is never stale. The
file records its holder (pid, host, start time) so that a refused process can say who
holds it. Where ``flock`` is missing (not POSIX) or unsupported (some network file
systems), a blocking lock is skipped (callers keep their files whole by atomic renames)
and a non-blocking one falls back to the recorded pid: a dead pid on this host is a
stale lock, taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class FileLock:
    """An exclusive lock on ``path``.

    ``acquire(blocking=False)`` returns False when another process holds it; as a context
    manager it waits (blocking). ``holder()`` describes the recorded holder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not self._lock(fd, blocking):
                os.close(fd)
                return False
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def _lock(self, fd: int, blocking: bool) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                return True
            except BlockingIOError:
                return False
            except OSError:  # a file system without flock
                pass
        return True if blocking else self._holder_is_gone(fd)

    def _record(self, fd: int | None = None) -> dict:
        try:
            if fd is not None:
                text = os.pread(fd, 4096, 0).decode()
            else:
                text = self.path.read_text()
            data = json.loads(text or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def holder(self) -> str:
        """``"pid N on HOST since T"`` of the recorded holder."""
        record = self._record()
        if not record:
            return f"see {self.path}"
        return f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')}"

    def _holder_is_gone(self, fd: int) -> bool:
        record = self._record(fd)
        if not record:
            return True
        if record.get("host") != socket.gethostname():
            return False  # another host's process cannot be checked: its lock is respected
        try:
            pid = int(record["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("%s: taking over the stale lock of pid %s", self.path, record.get("pid"))
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return pid == os.getpid()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["FileLock"]
