"""Safetensors save/load/export, run folders, parameter and FLOP reports."""

from medtune.checkpoints.io import (
    LoadReport,
    atomic_write,
    load_json,
    load_state,
    load_trained_state,
    load_weights,
    save_json,
    save_safetensors,
)

__all__ = [
    "LoadReport",
    "atomic_write",
    "load_json",
    "load_state",
    "load_trained_state",
    "load_weights",
    "save_json",
    "save_safetensors",
]
