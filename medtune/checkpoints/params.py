"""Compare tuning methods on one backbone: parameters, trained-weights size, FLOPs.

For each method the slice-wise segmenter (backbone + adapter + decoder) is built on
the ``meta`` device, so a ViT-B with 128-slice volumes costs no memory, and measured:

- ``total`` / ``trainable``: parameter elements (shared ones once); ``backbone_trainable``
  is the adapter's part alone (its own tensors + trained extras), the number peft's
  ``get_nb_trainable_parameters`` reports for LoRA.
- ``trained_bytes``: the exact size of the ``adapter.safetensors`` + ``head.safetensors``
  a run of this method writes (trained tensors: adapter + extras, and the decoder,
  BatchNorm statistics included), computed from names, shapes and dtypes with the
  safetensors layout (8-byte header length, JSON header padded to 8 bytes, raw data).
- ``gflops``: :func:`medtune.checkpoints.counting.flop_counter` over one forward of a
  ``(1, M, H, W, T)`` volume (matmuls, convolutions and attention; a multiply-add =
  2 FLOPs; FFTs, norms and activations are not counted).
  Models that cannot be built on ``meta`` (MONAI's SwinTransformer) are built and run on
  the CPU instead (then ``--flops-slices`` keeps the counting forward small).
  With ``flops_slices < T`` the forward runs on ``flops_slices`` slices and is scaled
  by ``T / flops_slices``: every part of the model is per slice or (adapters' slice
  convolutions and filters) linear in T, so the scaling is exact up to edge effects.

Whole 3D networks (the ``segment3d`` task: TransBTSV2, CGA U-Net, UNETR, SwinUNETR) are
compared by :func:`compare_networks`: parameters, the size of their ``model.safetensors``
and the GFLOPs of one forward of a ``(1, M, H, W, D)`` crop, counted the same way.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Mapping, Sequence

import torch

from medtune.checkpoints.counting import count_flops, count_parameters
from medtune.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("full", "decoder-only", "lora", "adaptformer", "st-adapter", "vpt", "med-tuning")
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class MethodCost:
    """One row of the comparison."""

    method: str
    total: int  # parameter elements of backbone + adapter + decoder
    trainable: int  # of which require grad
    backbone_trainable: int  # trainable elements inside the backbone (adapter + extras)
    trainable_percent: float  # 100 * trainable / total
    trained_bytes: int  # size of the trained-tensor safetensors file
    gflops: float  # per (1, M, H, W, T) volume forward


def safetensors_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Exact size in bytes of ``safetensors.torch.save_file(tensors, metadata=...)``.

    Works on meta tensors (only names, shapes and dtypes are read). Tensors are laid
    out by decreasing dtype size, then by name, as safetensors does.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_len = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + math.ceil(header_len / 8) * 8 + offset


def segmentation_config(
    backbone: str,
    in_chans: int,
    img_size: int,
    slices: int,
    method: str,
    *,
    backbone_options: Mapping | None = None,
    decoder: str = "auto",
    decoder_options: Mapping | None = None,
):
    """A :class:`SegmentationConfig` for one method on one backbone (nothing pretrained)."""
    from medtune.data.config import DataConfig
    from medtune.finetune.segmentation import SegmentationConfig, SegmentationModelConfig
    from medtune.models.backbones import BackboneConfig

    return SegmentationConfig(
        data=DataConfig(mode="3d", crop_size=[img_size, img_size, slices]),
        backbone=BackboneConfig(name=backbone, in_chans=in_chans, img_size=img_size, options=dict(backbone_options or {})),
        adapter={"method": method},
        model=SegmentationModelConfig(decoder=decoder, decoder_options=dict(decoder_options or {})),
    )


def forward_flops(model: torch.nn.Module, volume_shape: Sequence[int], device: str | torch.device = "meta") -> int:
    """FLOPs of ``model.forward_logits`` on a volume of ``volume_shape`` (no grad)."""
    volume = torch.zeros(tuple(volume_shape), device=device)
    return count_flops(lambda: model.forward_logits(volume))


def measure_method(cfg, num_classes: int = 4, flops_slices: int | None = None, device: str = "meta") -> MethodCost:
    """Build ``cfg``'s segmenter on ``device`` (default meta) and measure it."""
    from medtune.adapters import adapter_config_dict, adapter_state_dict
    from medtune.finetune.segmentation import build_segmenter
    from medtune.finetune.weights import head_state_dict

    try:
        with torch.device(device):
            model = build_segmenter(cfg, num_classes, load_pretrained=False)
    except (RuntimeError, NotImplementedError) as exc:
        if torch.device(device).type != "meta":
            raise
        # e.g. MONAI's SwinTransformer calls .item() while building: build it for real
        log.warning("%s cannot be built on the meta device (%s); building it on the CPU", cfg.backbone.name, exc)
        device = "cpu"
        model = build_segmenter(cfg, num_classes, load_pretrained=False)
    model.eval()
    total, trainable = count_parameters(model)
    backbone_trainable = count_parameters(model.backbone)[1]
    # what a run writes: adapter.safetensors (see save_adapter) + head.safetensors
    adapter = adapter_config_dict(model.backbone)
    trained_bytes = safetensors_size(
        adapter_state_dict(model.backbone), {"method": adapter["method"], "backbone": adapter["backbone"]}
    ) + safetensors_size(head_state_dict(model), {"task": "segmentation"})
    h, w, slices = cfg.roi_size
    counted = slices if flops_slices is None else min(int(flops_slices), slices)
    if counted < 1:
        raise ConfigError(f"--flops-slices must be >= 1, got {flops_slices}")
    flops = forward_flops(model, (1, cfg.backbone.in_chans, h, w, counted), device) * slices / counted
    return MethodCost(
        method=cfg.adapter["method"],
        total=total,
        trainable=trainable,
        backbone_trainable=backbone_trainable,
        trainable_percent=100.0 * trainable / max(total, 1),
        trained_bytes=trained_bytes,
        gflops=flops / 1e9,
    )


def compare_methods(
    backbone: str,
    in_chans: int,
    img_size: int,
    slices: int,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    num_classes: int = 4,
    flops_slices: int | None = None,
    backbone_options: Mapping | None = None,
    decoder_options: Mapping | None = None,
    device: str = "meta",
    decoder: str = "auto",
) -> list[MethodCost]:
    """One :class:`MethodCost` per method, same backbone, decoder, volume size."""
    rows = []
    for method in methods:
        cfg = segmentation_config(
            backbone, in_chans, img_size, slices, method,
            backbone_options=backbone_options, decoder=decoder, decoder_options=decoder_options,
        )
        rows.append(measure_method(cfg, num_classes, flops_slices, device))
    return rows


# --------------------------------------------------------------------------- whole networks


@dataclass
class NetworkCost:
    """One row of the whole-network comparison (``segment3d`` networks)."""

    network: str
    total: int  # parameter elements
    trainable: int  # of which require grad (all: trained from scratch)
    weights_bytes: int  # size of the model.safetensors a segment3d run writes (default loss)
    gflops: float  # per (1, M, H, W, D) crop forward


NETWORK_HEADERS = ("network", "total params", "trainable params", "weights (bytes)", "GFLOPs/crop")


def build_on_meta(build):
    """``build()`` on the meta device; a model that cannot be built there (MONAI's
    SwinTransformer calls ``.item()``) is built on the CPU and moved to meta."""
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError) as exc:
        log.info("building on the CPU, then moving to meta (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        return build().to("meta")


def measure_network(name: str, in_chans: int, crop: Sequence[int], num_classes: int = 4,
                    options: Mapping | None = None) -> NetworkCost:
    """Build network ``name`` for ``crop``-sized inputs on the meta device and measure it."""
    from medtune.models.networks import NetworkConfig, create_network

    cfg = NetworkConfig(network=name, in_chans=in_chans, options=dict(options or {}))
    model = build_on_meta(lambda: create_network(cfg, num_classes, crop)).eval()
    total, trainable = count_parameters(model)
    volume = torch.zeros((1, in_chans, *crop), device="meta")
    flops = count_flops(lambda: model(volume))
    size = safetensors_size({f"network.{k}": v for k, v in model.state_dict().items()}, {"task": "segment3d"})
    return NetworkCost(network=name, total=total, trainable=trainable, weights_bytes=size, gflops=flops / 1e9)


def compare_networks(names: Sequence[str], in_chans: int, crop: Sequence[int], num_classes: int = 4,
                     options: Mapping[str, Mapping] | None = None) -> list[NetworkCost]:
    """One :class:`NetworkCost` per network, same crop; ``options`` per network name."""
    if any(int(s) < 1 for s in crop):
        raise ConfigError(f"crop size {list(crop)} must be positive")
    return [measure_network(name, in_chans, tuple(int(s) for s in crop), num_classes, (options or {}).get(name))
            for name in names]


# --------------------------------------------------------------------------- output

HEADERS = ("method", "total params", "trainable params", "of which backbone", "trainable %", "trained weights (bytes)", "GFLOPs/volume")


def format_table(rows: Sequence[MethodCost], fmt: str = "markdown") -> str:
    """The comparison as ``markdown``, ``csv`` or ``json`` text."""
    return format_rows(rows, MethodCost, HEADERS, fmt)


def plot_costs(rows: Sequence[MethodCost], path: str | Path, title: str = "") -> Path:
    """Bar charts of trainable parameters, trained-weights size and GFLOPs per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.method for r in rows]
    panels = [
        ("trainable parameters (M)", [r.trainable / 1e6 for r in rows]),
        ("trained weights on disk (MB)", [r.trained_bytes / 1e6 for r in rows]),
        ("GFLOPs per volume", [r.gflops for r in rows]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (label, values) in zip(axes, panels):
        ax.bar(names, values, color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- self-distillation


@dataclass
class SelfDistillCost:
    """Training-step cost of one method without and with masked self-distillation."""

    method: str
    extra_params: int  # parameters the self-distillation branch adds
    train_gflops: float  # one training step (forward + backward) on a (1, M, H, W, T) crop
    train_gflops_sd: float  # the same step with the masked-input branch
    ratio: float  # train_gflops_sd / train_gflops


def count_train_flops(model: torch.nn.Module, volume_shape: Sequence[int], device: str | torch.device = "meta") -> int:
    """FLOPs of one training step (``model(batch)["loss"].backward()``) on a zero volume."""
    b, _, *spatial = volume_shape
    batch = {
        "image": torch.zeros(tuple(volume_shape), device=device),
        "label": torch.zeros((b, *spatial), dtype=torch.long, device=device),
    }
    model.train()
    return count_flops(lambda: model(batch)["loss"], backward=True)


def compare_self_distill(
    backbone: str,
    in_chans: int,
    img_size: int,
    slices: int,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    num_classes: int = 4,
    flops_slices: int | None = None,
    backbone_options: Mapping | None = None,
    decoder_options: Mapping | None = None,
    self_distill: Mapping | None = None,
) -> list[SelfDistillCost]:
    """What ``--self-distill`` costs each method: extra parameters and training FLOPs.

    The segmenters are built on the ``meta`` device; ``self_distill`` holds
    :class:`~medtune.finetune.self_distill.SelfDistillConfig` fields (defaults otherwise).
    """
    from dataclasses import replace

    from medtune.config import from_dict
    from medtune.finetune.segmentation import build_segmenter
    from medtune.finetune.self_distill import SelfDistillConfig

    sd_cfg = from_dict(SelfDistillConfig, dict(self_distill or {}), "self_distill")
    counted = slices if flops_slices is None else min(int(flops_slices), slices)
    if counted < 1:
        raise ConfigError(f"--flops-slices must be >= 1, got {flops_slices}")
    rows = []
    for method in methods:
        cfg = segmentation_config(
            backbone, in_chans, img_size, counted, method,
            backbone_options=backbone_options, decoder_options=decoder_options,
        )
        costs = {}
        for key, sd in (("plain", None), ("sd", sd_cfg)):
            with torch.device("meta"):
                model = build_segmenter(replace(cfg, self_distill=sd), num_classes, load_pretrained=False)
            params = count_parameters(model)[0]
            flops = count_train_flops(model, (1, in_chans, img_size, img_size, counted)) * slices / counted
            costs[key] = (params, flops)
        rows.append(
            SelfDistillCost(
                method=method,
                extra_params=costs["sd"][0] - costs["plain"][0],
                train_gflops=costs["plain"][1] / 1e9,
                train_gflops_sd=costs["sd"][1] / 1e9,
                ratio=costs["sd"][1] / max(costs["plain"][1], 1),
            )
        )
    return rows


def format_rows(rows: Sequence, row_type: type, headers: Sequence[str], fmt: str = "markdown") -> str:
    """Rows of dataclass ``row_type`` as ``markdown``, ``csv`` or ``json`` text."""
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2)
    fields = [f.name for f in dataclass_fields(row_type)]
    if fmt == "csv":
        return "\n".join([",".join(fields)] + [",".join(str(getattr(r, f)) for f in fields) for r in rows])
    if fmt != "markdown":
        raise ConfigError(f"unknown format '{fmt}' (markdown, csv, json)")

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [list(headers)] + [[cell(getattr(r, f)) for f in fields] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in cells]
    rule = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([lines[0], rule] + lines[1:])


SELF_DISTILL_HEADERS = ("method", "extra params", "train GFLOPs/step", "+ self-distill", "ratio")
