"""The seed 3D networks side by side: TransBTSV2, CGA U-Net, MONAI UNETR and SwinUNETR.

For each network with its recipe's default options (``medtune params --networks``), one run
prints:

- parameters and the size of its ``model.safetensors``;
- GFLOPs of one forward of a ``(1, 4, 128, 128, 128)`` crop, counted by
  :func:`medtune.checkpoints.counting.count_flops` on the meta device (matmuls,
  convolutions and attention; a multiply-add = 2 FLOPs; norms, activations and
  interpolation, e.g. the deformable convolution's trilinear sampling, are not counted);
- the wall time of one training step (forward, Dice + CE and the network's own loss
  terms, backward, Adam step) on a ``(1, 4, S, S, S)`` crop of random data with random
  labels, ``S = --step-crop``, after ``--warmup`` steps, mean over ``--steps`` steps,
  with ``--threads`` torch threads (2: the build machines' cores); and the peak resident
  memory the steps add.

The step crop defaults to 64^3, not 128^3: on 2 CPU cores a 128^3 training step of these
networks takes many minutes each (SwinUNETR's over half an hour) and SwinUNETR's needs
more memory than a shared build machine has. The convolutional parts scale with the
voxel count (8x from 64^3 to 128^3); self-attention over all tokens (TransBTSV2's
bottleneck, UNETR's encoder) grows faster. ``--step-crop 128`` measures it directly.

Each network trains in its own subprocess (its peak memory is its own); a worker whose
resident memory passes ``--max-rss-gb`` stops and the row says so, instead of taking a
shared machine down.

Run::

    python benchmarks/seed_networks.py                          # FLOPs at 128^3, steps at 64^3, 2 threads
    python benchmarks/seed_networks.py --step-crop 128 --warmup 0 --networks transbtsv2,cga_unet
    python benchmarks/seed_networks.py --device cuda --step-crop 128 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

NETWORKS = ("transbtsv2", "cga_unet", "unetr", "swinunetr")
LABELS = {"transbtsv2": "TransBTSV2", "cga_unet": "CGA U-Net", "unetr": "MONAI UNETR", "swinunetr": "MONAI SwinUNETR"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def guard_memory(limit_bytes: int, name: str) -> None:
    """Stop this worker (exit code 3) once its resident memory passes ``limit_bytes``."""

    def watch() -> None:
        while True:
            if rss_bytes() > limit_bytes:
                sys.stderr.write(f"{name}: resident memory over {limit_bytes / 2**30:.0f} GiB, stopped\n")
                sys.stderr.flush()
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def train_step_time(args: argparse.Namespace, name: str) -> dict:
    """Build ``name`` for ``step_crop``^3 crops and time its training steps (in this process)."""
    import torch

    from medtune.finetune.segment3d import Segment3DConfig, build_network_segmenter
    from medtune.models.networks import NetworkConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    crop = [args.step_crop] * 3
    cfg = Segment3DConfig(model=NetworkConfig(network=name, in_chans=4))
    cfg.data.crop_size = crop
    model = build_network_segmenter(cfg, args.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = {
        "image": torch.randn(1, 4, *crop, device=device),
        "label": torch.randint(0, args.num_classes, (1, *crop), device=device),
    }
    cuda = device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    before = rss_bytes()
    for _ in range(args.warmup):  # gradients and optimizer state exist after the first step
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"step_s": seconds, "peak_rss_bytes": int(peak), "terms": sorted(model.criterion.terms)}


def run_worker(args: argparse.Namespace, name: str) -> dict:
    argv = [sys.executable, __file__, "--worker", name, "--step-crop", str(args.step_crop), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device, "--num-classes", str(args.num_classes),
            "--max-rss-gb", str(args.max_rss_gb)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode == 3:
        return {"error": f"over {args.max_rss_gb:g} GiB resident memory"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--flops-crop", type=int, default=128, help="side of the crop FLOPs are counted on")
    parser.add_argument("--step-crop", type=int, default=64, help="side of the crop a training step runs on")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training steps")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-rss-gb", type=float, default=14.0, help="stop a worker above this resident memory")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        guard_memory(int(args.max_rss_gb * 2**30), args.worker)
        print(json.dumps(train_step_time(args, args.worker)))
        return

    from medtune.checkpoints.params import compare_networks

    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    crop = (args.flops_crop,) * 3
    costs = {row.network: row for row in compare_networks(names, 4, crop, args.num_classes)}
    print(f"seed 3D networks: GFLOPs per (1, 4, {args.flops_crop}^3) forward (counted); one training step "
          f"(batch 1, {args.step_crop}^3, Adam) on {args.device}, {args.threads} threads, mean of {args.steps} "
          f"after {args.warmup} warm-up step(s)", flush=True)
    header = f"{'network':<16} {'params':>12} {'weights MB':>11} {'GFLOPs/crop':>12} {'step s':>9} {'peak RSS GB':>12}  loss terms"
    print(header)
    print("-" * len(header), flush=True)
    for name in names:
        timing = run_worker(args, name)
        cost = costs[name]
        if "error" in timing:
            tail = f"{'-':>9} {'-':>12}  ({timing['error']})"
        else:
            tail = f"{timing['step_s']:>9.1f} {timing['peak_rss_bytes'] / 2**30:>12.1f}  {', '.join(timing['terms'])}"
        print(f"{LABELS.get(name, name):<16} {cost.total:>12,} {cost.weights_bytes / 1e6:>11.1f} {cost.gflops:>12.1f} {tail}",
              flush=True)


if __name__ == "__main__":
    main()
