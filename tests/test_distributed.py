"""medtune.distributed through 2 CPU processes: agree, main_first (an error on rank 0 reaches
every rank), barrier, split_gather; and the run folder named once for every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medtune import distributed

from tests import REPO

SCRIPT = """
import json, sys, time
from pathlib import Path

from medtune import distributed
from medtune.checkpoints import runs
from medtune.errors import DataError

out = Path(sys.argv[1])
state = distributed.processes()
rank = state.process_index
report = {"world": state.num_processes}

# agree: each rank would decide differently; all get rank 0's answer
report["agreed"] = distributed.agree(state, lambda: f"decided by {rank}")

# main_first: rank 0 runs first (it writes what the others read)
marker = out / "written_by_rank0.txt"
def build():
    if rank == 0:
        time.sleep(0.5)  # a slow rank 0 must still come first
        marker.write_text("rank 0")
    return marker.read_text()
report["main_first"] = distributed.main_first(state, build)

# main_first: an error on rank 0 is raised on every rank, same class and message
def fail_on_rank0():
    if rank == 0:
        raise DataError("case 7: broken label file")
    return "rank 1 must not get here"
try:
    distributed.main_first(state, fail_on_rank0)
    report["error"] = None
except DataError as exc:
    report["error"] = [type(exc).__name__, str(exc)]
    report["error_marked"] = getattr(exc, "medtune_on_every_rank", False)
    # an error every rank raised together: a rank that reported it waits for the others
    # (rank 1 reports a second late) before exiting, so the launcher stops no rank mid-report
    if rank == 1:
        time.sleep(1.0)
    start = time.perf_counter()
    distributed.settle_shared_error(exc)
    report["settle_waited"] = time.perf_counter() - start
    distributed.settle_shared_error(ValueError("one rank's own error"))  # unmarked: returns at once

# agree: an error while deciding reaches every rank too
try:
    distributed.agree(state, lambda: (_ for _ in ()).throw(DataError("no such folder")))
except DataError as exc:
    report["agree_error"] = str(exc)
    report["agree_error_marked"] = getattr(exc, "medtune_on_every_rank", False)

# split_gather: every row once, in order, on every rank
report["rows"] = distributed.split_gather(state, 7, lambda idx: [(i, i * i, rank) for i in idx])

# the run folder's timestamp is taken on rank 0 only (the clocks of the ranks differ here)
time.strftime = lambda fmt: f"2026010{rank}-000000"
with runs.open_run(state, None, "stem") as run_dir:
    report["run_dir"] = str(run_dir)
    report["locked"] = (run_dir / "run.lock").is_file()
    distributed.barrier(state)  # rank 0 leaves (and removes the empty folder) once every rank looked

distributed.barrier(state)
(out / f"rank{rank}.json").write_text(json.dumps(report))
"""


@pytest.mark.slow
def test_two_process_toolkit(tmp_path):
    script = tmp_path / "toolkit.py"
    script.write_text(SCRIPT)
    # PYTHONPATH: the processes run in tmp_path and must import this checkout's medtune
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29523", str(script), str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        assert report["agreed"] == "decided by 0"
        assert report["main_first"] == "rank 0"
        assert report["error"] == ["DataError", "case 7: broken label file"]
        assert report["agree_error"] == "no such folder"
        assert report["error_marked"] and report["agree_error_marked"]  # raised on every rank together
        assert [row[:2] for row in report["rows"]] == [[i, i * i] for i in range(7)]
        assert [row[2] for row in report["rows"]] == [0, 1, 0, 1, 0, 1, 0]  # rank r scored r, r + 2, ...
        assert report["run_dir"] == str(Path("checkpoints") / "stem-20260100-000000")
        assert report["locked"]  # rank 0 holds the folder's lock (the folder is shared)
    assert not (tmp_path / "checkpoints" / "stem-20260100-000000").exists()  # left empty: removed
    assert reports[0]["settle_waited"] > 0.7  # rank 0 waited for rank 1's late report


def test_one_process_needs_no_launcher():
    assert distributed.agree(None, lambda: 3) == 3
    assert distributed.main_first(None, lambda: 4) == 4
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    assert distributed.split_gather(None, 3, lambda idx: [(i, -i) for i in reversed(idx)]) == [(0, 0), (1, -1), (2, -2)]
    assert distributed.rank_and_world(None) == (0, 1)
