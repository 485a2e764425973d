"""What masked self-distillation costs per training step, measured side by side.

1. Referring segmentation (CRIS-style on CLIP): one training step (forward, backward,
   AdamW update) without and with CM-MaskSD's two masked branches, same weights and
   same batch; steps alternate so both see the same machine load.
2. Volumetric segmentation: the same for the ``--self-distill`` plug-in
   (``medtune.finetune.self_distill``) on a small 3D conv net.

Prints median step times, their ratio, and the FLOP ratio from the torch flop counter.

    python benchmarks/self_distill_cost.py                  # tiny models, ~1 min on 2 cores
    python benchmarks/self_distill_cost.py --config configs/cmmasksd_clip_vitb16_refcoco.yaml --batch 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from medtune.config import from_dict, read_yaml
from medtune.finetune.referring import ReferringModelConfig, build_referring_model
from medtune.finetune.referring.overhead import example_batch, self_distill_overhead
from medtune.finetune.self_distill import SelfDistillation, SelfDistillConfig
from medtune.models.clip import TINY_CLIP


def tiny_referring_config() -> ReferringModelConfig:
    return ReferringModelConfig(
        tiny_clip=copy.deepcopy(TINY_CLIP), image_size=32, context_length=12, fusion_dim=32,
        decoder_layers=1, decoder_heads=4, decoder_ffn_dim=64, dropout=0.0,
    )


def time_alternating(steps: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each named step function, called in alternation."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def referring_benchmark(cfg: ReferringModelConfig, batch_size: int, repeats: int) -> None:
    torch.manual_seed(0)
    with_sd = build_referring_model(replace_sd(cfg, True), load_clip_weights=False)
    plain = build_referring_model(replace_sd(cfg, False), load_clip_weights=False)
    plain.load_state_dict(with_sd.state_dict(), strict=False)  # same weights; plain lacks the two tokens
    batch = example_batch(cfg, with_sd.tokenizer, batch_size)

    def make_step(model: nn.Module):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            optimizer.step()

        return step

    times = time_alternating({"plain": make_step(plain), "cm-masksd": make_step(with_sd)}, repeats)
    overhead = self_distill_overhead(cfg, batch_size)
    name = cfg.clip_model if cfg.tiny_clip is None else "tiny CLIP"
    print(f"referring ({name}, {cfg.image_size} px, batch {batch_size}):")
    print(f"  step time plain      {times['plain'] * 1e3:8.1f} ms")
    print(f"  step time CM-MaskSD  {times['cm-masksd'] * 1e3:8.1f} ms")
    print(f"  time ratio           {times['cm-masksd'] / times['plain']:8.2f}x")
    print(f"  FLOP ratio           {overhead['flops_sd'] / overhead['flops_plain']:8.2f}x "
          f"({overhead['flops_plain'] / 1e9:.3f} -> {overhead['flops_sd'] / 1e9:.3f} GFLOP per step)")
    print(f"  extra parameters     {overhead['params_sd'] - overhead['params_plain']:8d} "
          f"(of {overhead['params_plain']:,})")


def replace_sd(cfg: ReferringModelConfig, enabled: bool) -> ReferringModelConfig:
    from dataclasses import replace

    return replace(cfg, cmmasksd=replace(cfg.cmmasksd, enabled=enabled))


def volumetric_benchmark(batch_size: int, size: int, repeats: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(4, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv3d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv3d(16, 4, 1),
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    volume = torch.randn(batch_size, 4, size, size, size)
    label = torch.randint(0, 4, (batch_size, size, size, size))
    distill = SelfDistillation(SelfDistillConfig(ratio=0.25, mode="patches", patch_size=8))

    def step(with_sd: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = net(volume)
        loss = F.cross_entropy(logits, label)
        if with_sd:
            loss = loss + distill(net, volume, logits)
        loss.backward()
        optimizer.step()

    times = time_alternating({"plain": lambda: step(False), "sd": lambda: step(True)}, repeats)
    print(f"volumetric plug-in (3D conv net, {batch_size} x 4 x {size}^3):")
    print(f"  step time plain      {times['plain'] * 1e3:8.1f} ms")
    print(f"  step time self-dist. {times['sd'] * 1e3:8.1f} ms")
    print(f"  time ratio           {times['sd'] / times['plain']:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a referring YAML; its model section is benchmarked (random weights)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    args = parser.parse_args()
    if args.config:
        cfg = from_dict(ReferringModelConfig, read_yaml(args.config).get("model", {}), "model")
    else:
        cfg = tiny_referring_config()
    cfg = replace_sd(cfg, False)
    referring_benchmark(cfg, args.batch, args.repeats)
    volumetric_benchmark(batch_size=2, size=32, repeats=args.repeats)


if __name__ == "__main__":
    main()
