"""A finetuned segmenter as ONNX: one sliding window in, its logits out, any batch size.

``medtune export RUN --format onnx --out DIR`` writes ``DIR/model.onnx`` (and the run's
``config.json``): input ``image`` ``(B, M, *roi)`` float32 z-scored modalities (the run's
``data.crop_size``, a fixed window: ``(B, M, H, W, T)`` for slice-wise models), output
``logits`` ``(B, K, *roi)``, ``B`` dynamic. LoRA is merged into the base weights first;
the other adapters (Med-Tuning, AdaptFormer, ...) are part of the exported graph, with
the window's slice count fixed. Export goes through ``torch.onnx.export(dynamo=True)``
(needs ``onnx`` and ``onnxscript``); when ``onnxruntime`` is installed the file is run
on a random batch and refused unless it gives PyTorch's logits (``atol`` 1e-4).
Sliding-window inference over whole volumes stays the caller's (MONAI's
``sliding_window_inference`` with ``roi_size`` = the window).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from medtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
ONNX_ATOL = 1e-4
OPSET = 18


class WindowLogits(nn.Module):
    """``image (B, M, *roi) -> logits (B, K, *roi)`` of a segmenter: what ONNX runs."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmenter.forward_logits(image)


def missing_onnx_packages() -> list[str]:
    """The packages an ONNX export needs that are not installed."""
    return [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]


def fold_adapters(model: nn.Module) -> nn.Module:
    """Merge LoRA into the base weights (in place); other adapters stay modules of the graph."""
    from medtune.adapters import find_adapted, merge_lora

    found = find_adapted(model)
    if found is not None and found[2].config.method == "lora":
        merge_lora(model)
    return model


def export_onnx(model: nn.Module, in_chans: int, roi_size: Sequence[int], path: Path, check: bool = True) -> Path:
    """Write ``model`` (a :class:`SliceSegmenter`, eval mode) to ``path`` for windows of ``roi_size``.

    Raises:
        ConfigError: ``onnx``/``onnxscript`` missing (``pip install 'medtune[deploy]'``).
        CheckpointError: the exporter failed, or onnxruntime's logits differ from PyTorch's.
    """
    missing = missing_onnx_packages()
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: pip install 'medtune[deploy]'")
    window = WindowLogits(fold_adapters(model)).eval()
    example = torch.randn(2, in_chans, *roi_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                window, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_shapes={"image": {0: batch}}, opset_version=OPSET, verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; name the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"ONNX export failed: {first}") from None
    program.save(str(path))
    if check:
        check_onnx(window, path, in_chans, roi_size)
    return path


def check_onnx(window: nn.Module, path: Path, in_chans: int, roi_size: Sequence[int]) -> float | None:
    """Run ``path`` with onnxruntime on a batch of 3 windows; refuse unless it matches PyTorch.

    Returns the largest absolute difference (None when onnxruntime is not installed).
    """
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("%s: not checked (onnxruntime is not installed)", path)
        return None
    import onnxruntime

    image = torch.randn(3, in_chans, *roi_size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: image.numpy()})
    with torch.no_grad():
        expected = window(image)
    difference = float((torch.from_numpy(logits) - expected).abs().max())
    if tuple(logits.shape) != tuple(expected.shape) or not difference <= ONNX_ATOL:
        raise CheckpointError(
            f"{path}: onnxruntime's logits differ from PyTorch's (max |diff| {difference:.3g} > {ONNX_ATOL})"
        )
    log.info("%s: onnxruntime matches PyTorch (max |diff| %.2g on a batch of 3)", path, difference)
    return difference


__all__ = ["ONNX_ATOL", "ONNX_INPUT", "ONNX_OUTPUT", "WindowLogits", "check_onnx", "export_onnx",
           "fold_adapters", "missing_onnx_packages"]
