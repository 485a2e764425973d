"""Several processes, one run: the helpers every multi-process medtune command uses.

Accelerate launches the processes; these helpers make them agree and fail together::

    from medtune import distributed

    processes = distributed.processes()                       # one per rank (PartialState)
    run_dir = distributed.agree(processes, choose_run_dir)    # decided by rank 0, the same on all
    data = distributed.main_first(processes, build_cache)      # rank 0 first (it fills shared caches)
    distributed.barrier(processes)                             # CPU (gloo) and GPU groups alike
    rows = distributed.split_gather(processes, len(cases), score)  # every case scored once

``main_first`` and ``agree`` never leave a rank waiting: an error on rank 0 is sent to
every rank and raised there too (a :class:`~medtune.errors.MedtuneError` keeps its class
and message, so every rank prints the same one line and exits with 2).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from medtune.errors import CheckpointError, ConfigError, DataError, MedtuneError

T = TypeVar("T")
Row = TypeVar("Row")

# the errors that cross process boundaries by name (others arrive as MedtuneError)
_KNOWN_ERRORS = {cls.__name__: cls for cls in (MedtuneError, ConfigError, DataError, CheckpointError)}


def processes():
    """The process group of this run (an ``accelerate.PartialState``; one process without a launcher).

    ``ACCELERATE_USE_CPU=true`` makes it a CPU (gloo) group even where GPUs exist. Under
    a launcher, each worker also watches the launcher (:func:`watch_launcher`).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes > 1:
        watch_launcher()
    release_group_at_exit()
    return state


def release_process_group() -> None:
    """Destroy the default process group, if one is still up. A process that exits with its
    gloo group alive leaves the group's threads to the C++ runtime's teardown, which can abort
    the process ("terminate called without an active exception", exit code -6) after its work
    is done; seen on this project's CI in 2-process tests that ended without destroying it."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def release_group_at_exit() -> None:
    """Register :func:`release_process_group` to run at exit, once per process however often
    it is called, where a process group is up (several processes); nothing otherwise."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(release_process_group)
        atexit.register(release_process_group)


WATCHDOG_SECONDS = 5.0


def watch_launcher(interval: float = WATCHDOG_SECONDS) -> None:
    """End this worker soon after its launcher dies (``kill -9`` of ``accelerate launch``).

    A daemon thread checks every ``interval`` seconds whether the parent process is still
    the one that started this worker; when the worker has been re-parented, the launcher
    is gone and nobody would ever collect this worker's result, so it exits (code 1) with
    one line. The run's last saved state is complete (states are renamed into place), so
    ``--resume latest`` continues it. Started once per process.
    """
    if any(t.name == "medtune-launcher-watch" for t in threading.enumerate()):
        return
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != launcher:
                sys.stderr.write(
                    f"medtune: error: the launcher (pid {launcher}) is gone; this worker stops "
                    "(continue the run with --resume latest)\n"
                )
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="medtune-launcher-watch", daemon=True).start()


def launched_processes():
    """:func:`processes` when a launcher started several (``WORLD_SIZE`` > 1), else None:
    for commands whose processes share work but need no group for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return processes()
    return None


def rank_and_world(state: Any = None) -> tuple[int, int]:
    """``(process index, number of processes)`` of an Accelerator/PartialState; ``(0, 1)`` for None."""
    if state is None:
        return 0, 1
    return int(state.process_index), int(state.num_processes)


def barrier(state: Any) -> None:
    """Wait for every process; works for CPU process groups on GPU machines too.

    Accelerate's ``wait_for_everyone`` passes ``device_ids=[local rank]`` to the barrier
    even for a gloo (CPU) group, which fails with "invalid device ordinal" when
    ``ACCELERATE_USE_CPU`` runs more processes than the machine has GPUs.
    ``state``: an Accelerator or PartialState.
    """
    if state.num_processes == 1:
        return
    from accelerate.utils import DistributedType

    if state.distributed_type == DistributedType.MULTI_CPU:
        import torch.distributed

        torch.distributed.barrier()
    else:
        state.wait_for_everyone()


def _broadcast(state: Any, value: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box)
    return box[0]


def _pack_error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _raise_packed(packed: tuple[str, str]) -> None:
    name, message = packed
    known = _KNOWN_ERRORS.get(name)
    raise _shared(known(message) if known else MedtuneError(f"{message} (on rank 0: {name})"))


def _shared(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same point (see :func:`settle_shared_error`)."""
    try:
        exc.medtune_on_every_rank = True  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__: left unmarked
        pass
    return exc


def settle_shared_error(exc: BaseException) -> None:
    """After a rank has reported an error that every rank raised together (from :func:`agree`
    or :func:`main_first`), wait for the others to report it too before exiting.

    Without this, the first rank to exit makes the launcher stop the others, and their
    report can be lost. Every rank raised the same error at the same point, so none is
    left waiting.
    """
    dist = sys.modules.get("torch.distributed")
    if not getattr(exc, "medtune_on_every_rank", False) or dist is None:
        return
    if dist.is_available() and dist.is_initialized():
        sys.stderr.flush()
        dist.barrier()


def agree(state: Any, decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0, its answer (or its error) on every rank.

    For values that must be the same everywhere but may differ when computed on each
    rank (a timestamped run-folder name, a resolved path).
    """
    if state is None or state.num_processes == 1:
        return decide()
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            outcome = ("ok", decide())
        except BaseException as exc:  # noqa: BLE001 - sent to every rank, re-raised below
            failure, outcome = exc, ("error", _pack_error(exc))
    outcome = _broadcast(state, outcome)
    if failure is not None:
        raise _shared(failure)
    if outcome[0] == "error":
        _raise_packed(outcome[1])
    return outcome[1]


def main_first(state: Any, build: Callable[[], T], per_node: bool = False) -> T:
    """Run ``build`` on rank 0 (with ``per_node``: on each node's first process), then, if
    that succeeded everywhere, on the other ranks.

    For work whose first run fills something shared (a preprocessing cache, generated
    files) that the others then read; ``per_node`` when each node has its own disk. Unlike
    ``accelerator.main_process_first``, an error of a first process reaches every rank,
    which raises it too, instead of leaving them waiting at a barrier.
    """
    if state is None or state.num_processes == 1:
        return build()
    leader = state.is_local_main_process if per_node else state.is_main_process
    result: Any = None
    failure: BaseException | None = None
    if leader:
        try:
            result = build()
        except BaseException as exc:  # noqa: BLE001 - sent to every rank, re-raised below
            failure = exc
    errors = [e for e in gather_rows(state, [None if failure is None else _pack_error(failure)]) if e is not None]
    if failure is not None:
        raise _shared(failure)
    if errors:
        _raise_packed(errors[0])
    return result if leader else build()


def shard(count: int, state: Any = None) -> list[int]:
    """This process's share of ``range(count)``: indices ``rank, rank + world, ...``."""
    rank, world = rank_and_world(state)
    return list(range(rank, count, world))


def split_gather(state: Any, count: int, score: Callable[[list[int]], list[Row]]) -> list[Row]:
    """Score ``range(count)`` split over the processes; every process gets every row.

    ``score(indices)`` returns rows for this process's share (:func:`shard`); the rows of
    all processes are gathered and sorted, so when each row starts with its item's index
    the result is the same as one process scoring everything, whatever the process
    count. Every process must call this.
    """
    rows = list(score(shard(count, state)))
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return sorted(rows)


def gather_rows(state: Any, rows: Sequence[Row]) -> list[Row]:
    """Every process's ``rows``, concatenated in rank order, on every process."""
    if state is None or state.num_processes == 1:
        return list(rows)
    from accelerate.utils import gather_object

    return list(gather_object(list(rows)))


__all__ = [
    "agree", "barrier", "gather_rows", "main_first", "processes", "rank_and_world", "shard", "split_gather",
    "watch_launcher",
]
