"""train.tune_host_allocator: glibc keeps training-sized blocks in its heap."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from tests import REPO

try:
    ctypes.CDLL("libc.so.6").mallopt
    GLIBC = sys.platform.startswith("linux")
except (OSError, AttributeError):
    GLIBC = False

# a fresh process: are a 96 MiB malloc (above glibc's largest mmap threshold, and more than
# the free heap top holds) and a 24 MiB one served from the heap ([heap] in /proc/self/maps)
# or from mappings of their own, before and after tune_host_allocator()?
SCRIPT = textwrap.dedent("""
    import ctypes
    from medtune.trainer.setup import tune_host_allocator

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def in_heap(size):
        block = libc.malloc(size)
        heap = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
        low, high = (int(x, 16) for x in heap[0].split()[0].split("-"))
        libc.free(block)
        return low <= block < high

    print(in_heap(96 << 20), in_heap(24 << 20), tune_host_allocator(), in_heap(96 << 20), in_heap(24 << 20),
          tune_host_allocator())
""")


def run(env: dict) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name not in env or env[name] == "":
            env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_tuning_moves_large_blocks_into_the_heap_once_and_respects_the_environment():
    # glibc's default: both get their own mmap; tuned (32 MiB threshold, no mappings): both in
    # the heap; a second call does nothing
    unset = {"MALLOC_MMAP_THRESHOLD_": "", "MALLOC_MMAP_MAX_": ""}
    assert run(unset) == ["False", "False", "True", "True", "True", "False"]
    # a threshold the user set is kept, and with it the mappings above it (the trim
    # threshold and top pad are still set)
    assert run({**unset, "MALLOC_MMAP_THRESHOLD_": "1000000"}) == ["False", "False", "True", "False", "False", "False"]
    # mappings the user allows are kept: 96 MiB is mapped, 24 MiB comes from the heap (threshold 32 MiB)
    assert run({**unset, "MALLOC_MMAP_MAX_": "65536"}) == ["False", "False", "True", "False", "True", "False"]
