"""Where a training step's time goes: torch.profiler's top operators by self time.

Profiles a few full training steps (forward, backward, Adam step, after warm-up) of

- ``fremae``: FreMAE as configured by default, on the demo's tiny ViT (depth 4, 64 px,
  batch 16 x 4 modalities), or on ViT-B/16 at 128 px with ``--vit-b``;
- ``med-tuning``: a Med-Tuning segmentation step (ViT-B/16 by default; ``--tiny`` for a
  4-block ViT-Tiny on small volumes);

and prints, per step kind, the operators that take the most self time (CPU, and CUDA
kernels' time on a GPU). Use it before and after a speed change to see what moved.

    python benchmarks/profile_step.py                      # tiny FreMAE + Med-Tuning, CPU
    python benchmarks/profile_step.py --vit-b --steps fremae
    python benchmarks/profile_step.py --device cuda --bf16 --vit-b
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

STEPS = ("fremae", "med-tuning")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="which steps to profile")
    parser.add_argument("--vit-b", action="store_true", help="FreMAE on ViT-B/16 at 128 px (default: tiny ViT at 64 px)")
    parser.add_argument("--batch", type=int, default=None, help="FreMAE slices per step (default 16 tiny, 8 ViT-B)")
    parser.add_argument("--tiny", action="store_true", help="Med-Tuning on a 4-block ViT-Tiny, 1 x 4 x 32 x 32 x 8")
    parser.add_argument("--adapter", default="med-tuning",
                        help="the segmentation step's adapter (default med-tuning; full or lora to compare)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--rows", type=int, default=12, help="operators shown (default 12)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--host-allocator", choices=("tuned", "default"), default="tuned",
                        help="glibc malloc as training sets it (train.tune_host_allocator, default) or its defaults")
    parser.add_argument("--optimizer", choices=("fused", "loop"), default="fused",
                        help="Adam as training builds it (optim.fused, default: one fused kernel over all "
                        "tensors) or PyTorch's per-tensor loop (what this benchmark timed before)")
    return parser.parse_args()


def fremae_step(args: argparse.Namespace) -> Callable[[], None]:
    from medtune.models import BackboneConfig, create_backbone
    from medtune.pretrain.objectives import FreMAEConfig, build_objective

    name, size, depth, batch = ("vit_base_patch16_224", 128, 12, 8) if args.vit_b else ("vit_tiny_patch16_224", 64, 4, 16)
    batch = args.batch or batch
    torch.manual_seed(0)
    backbone = create_backbone(
        BackboneConfig(name=name, in_chans=4, img_size=size, spatial_dims=2, options={"depth": depth})
    )
    objective = build_objective(FreMAEConfig(), backbone).to(args.device).train()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2  # (H, W) brain-like foreground
    image = torch.randn(batch, 4, size, size) * disc
    data = {"image": image.to(args.device), "foreground": disc.expand(batch, size, size).to(args.device)}
    print(f"fremae: {name} depth {depth} at {size}px, batch {batch} x 4 modalities")
    return training_step(objective, lambda: objective(data)["loss"], args)


def med_tuning_step(args: argparse.Namespace) -> Callable[[], None]:
    from medtune.checkpoints.params import segmentation_config
    from medtune.finetune.segmentation import build_segmenter

    name, size, slices, options = (
        ("vit_tiny_patch16_224", 32, 8, {"depth": 4}) if args.tiny else ("vit_base_patch16_224", 64, 16, None)
    )
    torch.manual_seed(0)
    model = build_segmenter(segmentation_config(name, 4, size, slices, args.adapter, backbone_options=options),
                            4, load_pretrained=False)
    model.to(args.device).train()
    data = {
        "image": torch.randn(1, 4, size, size, slices, device=args.device),
        "label": torch.randint(0, 4, (1, size, size, slices), device=args.device),
    }
    print(f"segmentation ({args.adapter}): {name} at 1 x 4 x {size} x {size} x {slices}")
    return training_step(model, lambda: model(data)["loss"], args)


def training_step(module: torch.nn.Module, loss_of: Callable[[], torch.Tensor],
                  args: argparse.Namespace) -> Callable[[], None]:
    from medtune.trainer.config import OptimConfig
    from medtune.trainer.setup import build_optimizer

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig(name="adam", lr=1e-4, fused=args.optimizer == "fused"))
    device_type = torch.device(args.device).type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def print_profile(step: Callable[[], None], args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    for _ in range(2):  # warm-up: allocations, cuDNN autotuning
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))


def main() -> None:
    args = parse_args()
    if args.host_allocator == "tuned":
        from medtune.trainer.setup import tune_host_allocator

        tune_host_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"# {where}{', bf16 autocast' if args.bf16 else ''}, {args.repeats} profiled steps each")
    builders = {"fremae": fremae_step, "med-tuning": med_tuning_step}
    for name in args.steps:
        print_profile(builders[name](args), args)


if __name__ == "__main__":
    main()
