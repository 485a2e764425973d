"""Pretraining throughput: what FreMAE's frequency targets cost, measured side by side.

One run, one backbone, one batch size. Each variant is a full training step (forward,
backward, Adam step) of a pretraining objective:

- ``fremae``: FreMAE as configured (focal frequency loss on high/low bands);
- ``fremae-pixel``: the same model and decoder with a plain pixel MSE on the same
  predictions (``objective.loss=pixel``); the ratio to ``fremae`` isolates the cost of
  the FFT targets and the focal frequency loss (target: at most 5 %);
- ``fremae-fr16``: FreMAE with the light decoder's full-resolution maps 16 channels wide
  instead of 32 (``objective.full_resolution_width=16``; the high band is learned less well
  in the same steps, see docs/fidelity.md);
- ``mae``, ``simmim``, ``mfm``: the baselines, for context.

Variants are timed in interleaved rounds (every round runs each variant once, in a
rotated order), so drifting machine load hits all of them alike; the reported ratio is
the median over rounds of the per-round ratios. The achieved GFLOP/s of each step
(FLOPs counted by :func:`medtune.checkpoints.counting.flop_counter`) of every row is compared
with this machine's measured matmul GFLOP/s (float32, or bfloat16 with ``--bf16``).

    python benchmarks/pretrain_throughput.py            # ~1-2 min on 2 cores
    python benchmarks/pretrain_throughput.py --backbone swinunetr --img-size 64 --batch 8
    python benchmarks/pretrain_throughput.py --compile   # eager and torch.compile rows
    python benchmarks/pretrain_throughput.py --device cuda --bf16 --backbone vit_base_patch16_224 \
        --img-size 128 --depth 12 --batch 64              # GPU rows (also peak memory)

On a GPU the timings wait for the device (``torch.cuda.synchronize``) before and after
each timed run of steps, not after every step, and each row also gets its peak memory
(``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before it).
``--json FILE`` appends one JSON object per row (as ``benchmarks/gpu_suite.sh`` collects).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from medtune.checkpoints.counting import flop_counter, matmul_peak_gflops
from medtune.errors import MedtuneError
from medtune.models import BackboneConfig, create_backbone
from medtune.pretrain.objectives import (
    FreMAEConfig,
    MAEConfig,
    MFMConfig,
    ObjectiveConfig,
    SimMIMConfig,
    build_objective,
)
from medtune.trainer.config import OptimConfig
from medtune.trainer.setup import build_optimizer, tune_host_allocator

VARIANTS: dict[str, ObjectiveConfig] = {
    "fremae": FreMAEConfig(),
    "fremae-pixel": FreMAEConfig(loss="pixel"),
    "fremae-fr16": FreMAEConfig(full_resolution_width=16),
    "mae": MAEConfig(),
    "simmim": SimMIMConfig(mask_block=16),
    "mfm": MFMConfig(),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224", help="backbone registry name")
    parser.add_argument("--img-size", type=int, default=64, help="slice side (default 64)")
    parser.add_argument("--depth", type=int, default=4, help="ViT depth (timm ViTs only, default 4)")
    parser.add_argument("--feature-size", type=int, default=12, help="SwinUNETR feature_size (default 12)")
    parser.add_argument("--modalities", type=int, default=4, help="input channels (default 4)")
    parser.add_argument("--batch", type=int, default=16, help="slices per step (default 16)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round (default 6)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as mixed_precision=bf16 trains)")
    parser.add_argument("--json", default=None, help="append one JSON object per row to this file")
    parser.add_argument("--profile", action="store_true", help="also print the FreMAE step's costliest ops")
    parser.add_argument("--compile", action="store_true",
                        help="also time each variant compiled with torch.compile (rows '<variant>+compile', as train.compile)")
    parser.add_argument("--host-allocator", choices=("tuned", "default"), default="tuned",
                        help="glibc malloc as training sets it (train.tune_host_allocator, default) or the C "
                        "library's defaults; benchmarks/host_allocator.py compares the two")
    parser.add_argument("--optimizer", choices=("fused", "loop"), default="fused",
                        help="Adam as training builds it (optim.fused, default: one fused kernel over all "
                        "tensors) or PyTorch's per-tensor loop (what this benchmark timed before)")
    return parser.parse_args()


def backbone_config(args: argparse.Namespace) -> BackboneConfig:
    if args.backbone == "swinunetr":
        options = {"feature_size": args.feature_size}
    elif args.backbone.startswith(("vit_", "deit")):
        options = {"depth": args.depth}
    else:
        options = {}
    return BackboneConfig(
        name=args.backbone, in_chans=args.modalities, img_size=args.img_size, spatial_dims=2, options=options
    )


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Brain-like slices: a zero background around a disc of noisy tissue."""
    g = torch.Generator().manual_seed(0)
    side = args.img_size
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (0.4 * side) ** 2  # (H, W)
    image = torch.randn(args.batch, args.modalities, side, side, generator=g) * disc
    batch = {"image": image, "foreground": disc.expand(args.batch, side, side).clone()}
    return {k: v.to(args.device) for k, v in batch.items()}


def make_step(objective: torch.nn.Module, batch: dict, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig(name="adam", lr=1e-4, fused=args.optimizer == "fused"))
    device_type = torch.device(args.device).type

    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = objective(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no .item(): a GPU keeps running ahead; timings synchronize

    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_peak_memory(step: Callable[[], torch.Tensor], device: str) -> float | None:
    """MiB a step allocates at its peak on a GPU beyond what was allocated before it (None on a CPU)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    with flop_counter() as counter:  # medtune's counter (convolution backward corrected)
        step()
    return counter.get_total_flops()


def main() -> None:
    args = parse_args()
    if args.host_allocator == "tuned":
        tune_host_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args)

    steps: dict[str, Callable[[], torch.Tensor]] = {}
    for variant in args.variants:
        for compiled in (False, True) if args.compile else (False,):
            name = f"{variant}+compile" if compiled else variant
            torch.manual_seed(0)
            try:
                objective = build_objective(VARIANTS[variant], create_backbone(backbone_config(args)))
            except (MedtuneError, ImportError, ValueError) as exc:
                print(f"{name:>13}: skipped ({str(exc).splitlines()[0]})")
                continue
            objective.to(args.device).train()
            if compiled:
                objective.compile()  # in place, as train.compile does
            steps[name] = make_step(objective, batch, args)
            for _ in range(3):  # warm-up: allocations, first-call costs (compilation), cuDNN autotuning
                steps[name]()
            synchronize(args.device)
    if "fremae" not in steps:
        raise SystemExit("fremae could not be built; nothing to compare")

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"backbone {args.backbone} at {args.img_size}px, batch {args.batch} x {args.modalities} modalities, "
        f"{where}{', bf16 autocast' if args.bf16 else ''}, {args.rounds} rounds x {args.steps} steps"
    )
    rates: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every round
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            synchronize(args.device)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak_gflops(args.device, dtype)
    flops = {name: step_flops(steps[name.removesuffix("+compile")]) for name in names}  # compiled: eager's math
    memory = {name: step_peak_memory(steps[name], args.device) for name in names}
    width = max(13, *(len(name) for name in names))
    print(f"{'variant':>{width}}  {'slices/s':>9}  {'vs fremae':>9}  {'GFLOP/step':>10}  {'GFLOP/s':>8}  {'of peak':>7}"
          f"  {'peak MiB':>8}")
    for name in names:
        ratio = statistics.median(r / f for r, f in zip(rates[name], rates["fremae"]))
        rate = statistics.median(rates[name])
        achieved = flops[name] * rate / args.batch / 1e9
        mib = "-" if memory[name] is None else f"{memory[name]:.0f}"
        print(f"{name:>{width}}  {rate:9.1f}  {ratio:9.3f}  {flops[name] / 1e9:10.2f}  {achieved:8.1f}  "
              f"{100 * achieved / peak:6.1f}%  {mib:>8}")
        if args.json:
            row = {"benchmark": "pretrain_throughput", "row": name, "slices_s": rate, "vs": "fremae", "ratio": ratio,
                   "gflop_step": flops[name] / 1e9, "gflop_s": achieved, "of_peak": achieved / peak,
                   "peak_mib": memory[name], "batch": args.batch, "backbone": args.backbone, "device": where}
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    print(f"peak: {peak:.1f} GFLOP/s {str(dtype).removeprefix('torch.')} matmul measured on this machine; FLOPs "
          "counted by medtune's flop_counter (matmuls, convolutions, attention; not FFTs or elementwise ops)")
    if "fremae-pixel" in rates:
        cost = statistics.median(p / f for p, f in zip(rates["fremae-pixel"], rates["fremae"])) - 1.0
        verdict = "within" if cost <= 0.05 else "ABOVE"
        print(f"frequency-target cost: fremae is {100 * cost:.1f}% slower than fremae-pixel ({verdict} the 5% target)")
    if args.profile:
        print_profile(steps["fremae"], args.device)


def print_profile(step: Callable[[], torch.Tensor], device: str, rows: int = 12) -> None:
    """The FreMAE step's costliest ops (self time), to see what the frequency loss costs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


if __name__ == "__main__":
    main()
