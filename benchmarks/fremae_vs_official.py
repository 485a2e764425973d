"""FreMAE in medtune vs the official FreMIM code: one training step of the same whole network.

    python benchmarks/fremae_vs_official.py --official PATH_TO_FREMIM_CLONE [--rounds 3] [--device cuda]

The official modules (``models/head.py``, ``models/Swin_UNTER/pretrain_frequency_2d.py``,
``tools/loss.py``) are loaded from the local clone given on the command line, never
copied into medtune; their ``.cuda()`` calls are removed from the source text at load
time so that they run on any device (tensors are then moved with ``.to(device)``). The
official step is what ``train_2d_FreMIM/train_frequency_pretrain_2D_fore.py`` does per
iteration: ``SwinUNETR(img 128, 4 modalities, feature_size 48, frequency_channels 48)``
with pixel masking (ratio 0.25) inside its forward, ``FocalFrequencyLoss_2D_pooling``
(log matrix, pass band 10) on the high band (weight 1) and the pooled low band (1.3),
``torch.optim.Adam(lr 1e-4, weight_decay 1e-5, amsgrad)``.

medtune's step is its official recipe (``configs/fremae_swinunetr2d_brats.yaml``: the
same whole network, 26,999,750 parameters, official loss and masking) with the optimizer
medtune's trainer builds from the recipe and the recipe's precision (``mixed_precision:
auto``: fp32 on CPU, bf16 on a GPU that has it).

Both train on the same batch (``B x 4 x 128 x 128`` slices, background exactly 0) in
interleaved rounds (each round times both, in alternating order, so drifting machine
load hits both alike); per-step times are medians, the ratio is the median of the
per-round ratios. Wall time is the measure; on a shared machine the process's CPU time
(``time.process_time``, all threads) is printed too, as it is far less sensitive to other
processes' load (with ``--threads 1`` it is the work done).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "fremae_swinunetr2d_brats.yaml"
OFFICIAL_FILES = {
    "models.head": "models/head.py",
    "models.Swin_UNTER.pretrain_frequency_2d": "models/Swin_UNTER/pretrain_frequency_2d.py",
    "fremim_tools_loss": "tools/loss.py",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="local clone of github.com/Rubics-Xuan/FreMIM")
    parser.add_argument("--batch", type=int, default=4, help="slices per step (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per model per round (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def load_official(clone: Path) -> dict[str, types.ModuleType]:
    """The official modules, executed from the clone's source with ``.cuda(...)`` removed."""
    if not (clone / OFFICIAL_FILES["models.head"]).is_file():
        sys.exit(f"{clone}: not a FreMIM clone (no {OFFICIAL_FILES['models.head']})")
    # the clone's models/__init__.py imports files the repository does not have: stand-in packages
    for package in ("models", "models.Swin_UNTER"):
        stand_in = types.ModuleType(package)
        stand_in.__path__ = []  # type: ignore[attr-defined]
        sys.modules[package] = stand_in
    modules = {}
    for name, relative in OFFICIAL_FILES.items():
        path = clone / relative
        source = re.sub(r"\.cuda\([^)]*\)", "", path.read_text())
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module
        exec(compile(source, str(path), "exec"), module.__dict__)
        modules[name] = module
    return modules


def brain_like_batch(batch: int, device: torch.device) -> torch.Tensor:
    """``(B, 4, 128, 128)``: noise inside a disc, exactly 0 outside (as skull-stripped MRI)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 4, 128, 128, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    return (images * (((yy - 64) ** 2 + (xx - 64) ** 2) < 56**2)).to(device)


def official_step_fn(modules, images: torch.Tensor):
    network = modules["models.Swin_UNTER.pretrain_frequency_2d"]
    loss_module = modules["fremim_tools_loss"]
    torch.manual_seed(0)
    model = network.SwinUNETR(
        img_size=(128, 128), in_channels=4, out_channels=4, feature_size=48,
        frequency_channels=48, whether_mask=True, pixel_mask_rate=0.25,
    ).to(images.device).train()
    criterion = loss_module.FocalFrequencyLoss_2D_pooling(log_matrix=True, pass_band=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5, amsgrad=True)

    def step() -> float:
        high, low = model(images, 0.25)
        loss = criterion(high, images, pass_manner="high", stage_manner="low_level", ave_spectrum=False)
        loss = loss + 1.3 * criterion(low, images, pass_manner="low", stage_manner="high_level", ave_spectrum=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, step


def medtune_step_fn(images: torch.Tensor):
    from medtune.models import create_backbone
    from medtune.pretrain import build_objective
    from medtune.pretrain.config import load_pretrain_config
    from medtune.trainer import build_optimizer
    from medtune.trainer.setup import resolve_mixed_precision

    cfg = load_pretrain_config(RECIPE)
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, create_backbone(cfg.backbone)).to(images.device).train()
    optimizer = build_optimizer([p for p in objective.parameters() if p.requires_grad], cfg.train.optim)
    precision = resolve_mixed_precision(cfg.train.mixed_precision) if images.device.type == "cuda" else "no"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> float:
        with autocast:
            loss = objective({"image": images})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return objective, step, precision


def timed(step, steps: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds per step (medians of ``steps``)."""
    wall, cpu = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = brain_like_batch(args.batch, device)
    official_model, official_step = official_step_fn(load_official(args.official.resolve()), images)
    medtune_model, medtune_step, precision = medtune_step_fn(images)
    counts = {name: sum(p.numel() for p in model.parameters())
              for name, model in (("official", official_model), ("medtune", medtune_model))}

    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch} x 4 x 128 x 128, "
          f"{args.rounds} rounds x {args.steps} step(s)")
    print(f"parameters: official {counts['official']:,}, medtune {counts['medtune']:,}")
    print(f"medtune precision: {'fp32' if precision == 'no' else precision}; official: fp32")
    official_step(), medtune_step()  # warm-up (allocator, kernels, first-call costs)

    rows = []
    for round_index in range(args.rounds):
        order = [("official", official_step), ("medtune", medtune_step)]
        if round_index % 2:
            order.reverse()
        seconds = {name: timed(step, args.steps, device) for name, step in order}
        rows.append(seconds)
        official, medtune = seconds["official"], seconds["medtune"]
        print(f"round {round_index + 1}: official {official[0]:.3f} s/step (cpu {official[1]:.3f}), "
              f"medtune {medtune[0]:.3f} s/step (cpu {medtune[1]:.3f}), ratio {official[0] / medtune[0]:.2f} "
              f"(cpu {official[1] / medtune[1]:.2f})")

    def median(name: str, which: int) -> float:
        return statistics.median(r[name][which] for r in rows)

    def ratio(which: int) -> float:
        return statistics.median(r["official"][which] / r["medtune"][which] for r in rows)

    for label, name in (("official FreMIM", "official"), ("medtune FreMAE ", "medtune")):
        wall = median(name, 0)
        print(f"{label}: {args.batch / wall:7.2f} slices/s ({wall:.3f} s/step, cpu {median(name, 1):.3f} s/step)")
    print(f"speed ratio medtune / official: {ratio(0):.2f}x wall, {ratio(1):.2f}x cpu time "
          f"(medians of per-round ratios; goal >= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
