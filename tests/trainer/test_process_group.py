"""The default process group is destroyed at exit (a gloo group left to the C++ runtime's
teardown can abort a finished process): registered by every process that makes an
accelerator or calls ``distributed.processes()``."""

from __future__ import annotations

import atexit

import torch
import torch.distributed as dist

from medtune import distributed
from medtune.distributed import release_process_group
from medtune.trainer import TrainConfig, make_accelerator


def test_release_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()
    release_process_group()  # nothing left: no error
    assert not dist.is_initialized()


def test_make_accelerator_registers_the_release_once_in_several_processes(monkeypatch):
    registered: list = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", lambda f: registered.remove(f) if f in registered else None)
    make_accelerator(TrainConfig())
    assert registered == []  # one process, no group: nothing to release
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    make_accelerator(TrainConfig())
    make_accelerator(TrainConfig())
    assert registered == [release_process_group]


def test_processes_registers_the_release_where_a_group_is_up(monkeypatch):
    registered: list = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", lambda f: registered.remove(f) if f in registered else None)
    distributed.processes()
    assert registered == []  # one process, no group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as under a launcher
    distributed.processes()
    distributed.processes()
    assert registered == [release_process_group]  # once per process
