"""Training cost of full finetuning vs LoRA vs Med-Tuning, measured side by side.

Same backbone, decoder, batch and slice count for every method; each method is trained
for a few steps on random volumes ``(B, M, H, W, T)`` with random labels, and we print
the mean step time (forward + backward + Adam step, after one warm-up step) and the
peak training memory, with ratios to full finetuning. ``med-tuning+gc`` is Med-Tuning
with ``model.gradient_checkpointing`` (backbone blocks recomputed in backward); a
``+compile`` suffix (``full+compile``, ``med-tuning+compile``) times the method compiled
with torch.compile as ``train.compile: true`` does (the warm-up step compiles). A ``@DECODER``
suffix (``full@multistage``) builds that segmentation decoder instead of the default
(``auto``: UperNet on a plain ViT), e.g. to time FreMAE's light-decoder trunk with its
full-resolution input path against UperNet.

How memory is measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` during the steps minus the memory
  allocated before them (model weights), i.e. the peak of activations + gradients +
  optimizer state, exactly as the caching allocator sees it.
- CPU: PyTorch has no CPU allocator statistics, so each method runs in a fresh
  subprocess and we take the process's peak resident set size (``ru_maxrss``) after the
  steps minus its resident size right before them (model and data already built).
  That delta is what training adds on top of the weights; it is coarser than the CUDA
  number (allocator caching, page granularity) but it counts every allocation, including
  those a saved-tensor count would miss (checkpoint inputs, optimizer state, grads).

Seen (2026-11-25): on one H100, ViT-B/16, batch 2 x 4x128x128x32 (step s, peak memory
vs full): LoRA 1.43x / 0.84x, Med-Tuning 2.47x / 0.78x, Med-Tuning + checkpointing
4.25x / 0.34x; batch 1 x 4x128x128x128: LoRA 0.90x / 0.92x, Med-Tuning 1.22x / 0.85x,
Med-Tuning + checkpointing 1.70x / 0.35x. On 2 shared CPU cores, 4x64x64x16 (peak RSS
delta), with the per-tensor Adam loop (``--optimizer loop``): LoRA 0.75x / 0.35x, Med-Tuning
0.80x / 0.31x, + checkpointing 1.03x / 0.24x; with fused Adam, as training builds it
(2026-12-02, idle machine, median of 7 pairs): Med-Tuning 0.78x (benchmarks/README.md).

Run::

    python benchmarks/finetune_cost.py                      # CPU defaults (ViT-B, 64 px, 16 slices)
    python benchmarks/finetune_cost.py --device cuda --img-size 128 --slices 64 --batch 2
    python benchmarks/finetune_cost.py --methods full,full+compile,med-tuning,med-tuning+compile
    python benchmarks/finetune_cost.py --methods full,full@multistage,med-tuning,med-tuning@multistage
    python benchmarks/finetune_cost.py --device cuda --bf16 --img-size 128 --slices 32 --batch 2

``--bf16`` trains under bf16 autocast (as ``mixed_precision: bf16``) and compares with the
measured bf16 matmul peak; ``--json FILE`` appends one JSON object per method (as
``benchmarks/gpu_suite.sh`` collects).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("full", "lora", "med-tuning", "med-tuning+gc")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace, method: str) -> dict:
    """Train ``method`` for ``args.steps`` steps in this process and return its costs."""
    import torch

    from medtune.checkpoints.params import segmentation_config
    from medtune.finetune.segmentation import build_segmenter
    from medtune.trainer.config import OptimConfig
    from medtune.trainer.setup import build_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    method, _, decoder = method.partition("@")
    adapter, _, variant = method.partition("+")
    if variant not in ("", "gc", "compile"):
        sys.exit(f"unknown variant '+{variant}' in {method} (known: +gc, +compile)")
    cfg = segmentation_config(
        args.backbone, args.in_chans, args.img_size, args.slices, adapter,
        backbone_options={"depth": args.depth} if args.depth else None, decoder=decoder or "auto",
    )
    cfg.model.gradient_checkpointing = variant == "gc"
    model = build_segmenter(cfg, args.num_classes, load_pretrained=False)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig(name="adam", lr=1e-4, fused=args.optimizer == "fused"))
    image = torch.randn(args.batch, args.in_chans, args.img_size, args.img_size, args.slices, device=device)
    label = torch.randint(0, args.num_classes, (args.batch, args.img_size, args.img_size, args.slices), device=device)
    batch = {"image": image, "label": label}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()

    if variant == "compile":
        model.compile()  # in place, as train.compile does; the warm-up step compiles

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    step()  # warm-up: creates gradients and optimizer state
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    flops = None  # a compiled step runs inductor's kernels, which the counter does not see: the parent
    if variant != "compile":  # takes the eager method's count (the same math)
        from medtune.checkpoints.counting import flop_counter

        with flop_counter() as counter:
            step()
        flops = counter.get_total_flops()
    return {
        "method": method + (f"@{decoder}" if decoder else ""),
        "step_s": seconds,
        "peak_bytes": int(peak),
        "trainable": sum(p.numel() for p in params),
        "flops": flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--depth", type=int, default=None, help="override the ViT depth (default: the model's)")
    parser.add_argument("--in-chans", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as mixed_precision: bf16)")
    parser.add_argument("--json", default=None, help="append one JSON object per method to this file")
    parser.add_argument("--host-allocator", choices=("tuned", "default"), default="tuned",
                        help="glibc malloc as training sets it (train.tune_host_allocator, default) or its defaults")
    parser.add_argument("--optimizer", choices=("fused", "loop"), default="fused",
                        help="Adam as training builds it (optim.fused, default: one fused kernel over all "
                        "tensors) or PyTorch's per-tensor loop (what this benchmark timed before)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one method in a fresh process (clean peak RSS)
        if args.host_allocator == "tuned":
            from medtune.trainer.setup import tune_host_allocator

            tune_host_allocator()
        sys.stdout.write(json.dumps(measure(args, args.worker)) + "\n")
        return

    results = []
    for method in args.methods.split(","):
        argv = [a for a in sys.argv[1:]]
        out = subprocess.run([sys.executable, __file__, *argv, "--worker", method], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next((r for r in results if r["method"] == "full"), results[0])
    counted = {r["method"]: r["flops"] for r in results if r["flops"] is not None}
    for r in results:  # a compiled step does the eager step's math
        r["flops"] = counted.get(r["method"].replace("+compile", ""))

    import torch

    from medtune.checkpoints.counting import matmul_peak_gflops

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak_gflops(args.device, dtype)
    print(
        f"# {args.backbone}{f' depth {args.depth}' if args.depth else ''}, batch {args.batch} x "
        f"{args.in_chans}x{args.img_size}x{args.img_size}x{args.slices}, device {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}"
        f"{', bf16 autocast' if args.bf16 else ''}, "
        f"memory = {'CUDA max_memory_allocated' if args.device.startswith('cuda') else 'peak RSS delta'}"
    )
    print(f"{'method':<22} {'trainable':>12} {'step s':>8} {'x full':>7} {'peak MB':>9} {'x full':>7} "
          f"{'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>7}")
    for r in results:
        achieved = None if r["flops"] is None else r["flops"] / r["step_s"] / 1e9
        if achieved is None:
            rate = f"{'-':>8} {'-':>8} {'-':>7}"
        else:
            rate = f"{r['flops'] / 1e9:>8.1f} {achieved:>8.1f} {100 * achieved / peak:>6.1f}%"
        if args.json:
            row = {"benchmark": "finetune_cost", "row": r["method"], "step_s": r["step_s"], "vs": full["method"],
                   "ratio": r["step_s"] / full["step_s"], "peak_mib": r["peak_bytes"] / 2**20,
                   "memory_ratio": r["peak_bytes"] / max(full["peak_bytes"], 1), "trainable": r["trainable"],
                   "gflop_step": None if r["flops"] is None else r["flops"] / 1e9, "gflop_s": achieved,
                   "of_peak": None if achieved is None else achieved / peak, "batch": args.batch,
                   "backbone": args.backbone,
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"cpu, {torch.get_num_threads()} threads"}
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        print(
            f"{r['method']:<22} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['step_s'] / full['step_s']:>7.2f} "
            f"{r['peak_bytes'] / 2**20:>9.1f} {r['peak_bytes'] / max(full['peak_bytes'], 1):>7.2f} {rate}"
        )
    print(f"peak: {peak:.1f} GFLOP/s {str(dtype).removeprefix('torch.')} matmul measured on this machine ({args.device}); FLOPs counted by "
          "medtune's flop_counter on the eager step (a compiled row: its eager method's count)")
    by_name = {r["method"]: r for r in results}
    if "med-tuning" in by_name and "med-tuning+gc" in by_name:
        plain, gc = by_name["med-tuning"], by_name["med-tuning+gc"]
        print(
            f"gradient checkpointing on Med-Tuning: time x{gc['step_s'] / plain['step_s']:.2f}, "
            f"peak memory x{gc['peak_bytes'] / max(plain['peak_bytes'], 1):.2f}"
        )


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
