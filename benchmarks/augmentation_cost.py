"""Augmentation cost: samples/s the data loader delivers with and without augmentation,
against the rate a training step consumes them, measured side by side in one run.

Writes synthetic BraTS cases, caches them, then for 2D slices (pretraining, FreMAE) and
3D crops (segmentation finetuning) times a DataLoader with 2 workers delivering batches:

- ``none``: no augmentation;
- ``fremim``: the default ``data.augment`` (flips on every axis, per-channel intensity
  scale and shift: the official FreMIM pipeline);
- ``nnunet``: the default plus every option at nnU-Net's probabilities (rotation/zoom
  0.2, gamma 0.3, noise 0.1, blur 0.2).

and the training step each feeds, on the same machine (this process, no workers): a
tiny FreMAE ViT step on the slices, a tiny Med-Tuning segmenter step on the crops. The
loader keeps up when its rate is above the step's. Variants run in interleaved rounds
(medians), so drifting machine load hits all alike.

    python benchmarks/augmentation_cost.py                  # ~2 min on 2 cores
    python benchmarks/augmentation_cost.py --rounds 5 --batches 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medtune.data import AugmentConfig, Augmenter, CropDataset, SliceDataset, VolumeCache, find_cases, synthesize_brats

NNUNET = dict(rotation=30.0, scale=0.3, affine_prob=0.2, gamma_prob=0.3, noise_prob=0.1, blur_prob=0.2)


def loader_rate(dataset, batch_size: int, batches: int, workers: int) -> float:
    """Samples per second a shuffled DataLoader delivers (after its first batch)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)  # workers started, caches warm
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        count += len(next(iterator)["image"])
    return count / (time.perf_counter() - start)


def step_rate(model, batch: dict, steps: int) -> float:
    """Samples per second a forward + backward + Adam step of ``model`` consumes."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    model(batch)["loss"].backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    return steps * len(batch["image"]) / (time.perf_counter() - start)


def fremae_model(img_size: int):
    from medtune.models import BackboneConfig, create_backbone
    from medtune.pretrain import FreMAEConfig, build_objective

    backbone = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", in_chans=4, img_size=img_size,
                                              options={"depth": 4}))
    return build_objective(FreMAEConfig(radius=10, decoder_width=32), backbone)


def segmenter_model(img_size: int, slices: int):
    from medtune.checkpoints.params import segmentation_config
    from medtune.finetune.segmentation import build_segmenter

    cfg = segmentation_config(backbone="vit_tiny_patch16_224", in_chans=4, img_size=img_size, slices=slices,
                              backbone_options={"depth": 4}, decoder_options={"channels": 32}, method="med-tuning")
    return build_segmenter(cfg, 4, load_pretrained=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 64))
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=128, help="2D slice side (FreMAE recipe: 128)")
    parser.add_argument("--slices", type=int, default=16, help="slices per 3D crop (img-size x img-size x slices)")
    parser.add_argument("--batch-2d", type=int, default=16)
    parser.add_argument("--batch-3d", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per loader measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        synthesize_brats(root, cases=args.cases, shape=tuple(args.shape))
        cache = VolumeCache(find_cases(root), Path(tmp) / "cache", show_progress=False)
        configs = {"none": None, "fremim": AugmentConfig(), "nnunet": AugmentConfig(**NNUNET)}

        def slices(cfg):
            return SliceDataset(cache, args.img_size, min_foreground=0.05, augment=cfg and Augmenter(cfg, 2))

        def crops(cfg):
            size = (args.img_size, args.img_size, args.slices)
            return CropDataset(cache, size, samples_per_volume=8, augment=cfg and Augmenter(cfg, 3))

        rates: dict[str, list[float]] = {f"{kind} {name}": [] for kind in ("2D", "3D") for name in configs}
        names = list(configs)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[: r % 3]:
                rates[f"2D {name}"].append(loader_rate(slices(configs[name]), args.batch_2d, args.batches, args.workers))
                rates[f"3D {name}"].append(loader_rate(crops(configs[name]), args.batch_3d, args.batches, args.workers))

        batch_2d = next(iter(DataLoader(slices(configs["fremim"]), batch_size=args.batch_2d)))
        batch_3d = next(iter(DataLoader(CropDataset(cache, (args.img_size, args.img_size, args.slices), with_label=True,
                                                    augment=Augmenter(AugmentConfig(), 3)), batch_size=args.batch_3d)))
        step_2d = step_rate(fremae_model(args.img_size), batch_2d, steps=3)
        step_3d = step_rate(segmenter_model(args.img_size, args.slices), batch_3d, steps=3)

    print(f"{args.cases} cases {tuple(args.shape)} x4 modalities; loader: {args.workers} workers, "
          f"{args.rounds} interleaved rounds of {args.batches} batches (medians); torch threads "
          f"{torch.get_num_threads()}")
    for kind, unit, step, batch in (("2D", "slices", step_2d, args.batch_2d), ("3D", "crops", step_3d, args.batch_3d)):
        size = f"{args.img_size}x{args.img_size}" + (f"x{args.slices}" if kind == "3D" else "")
        print(f"{kind} {unit} {size}, batch {batch}:")
        base = statistics.median(rates[f"{kind} none"])
        for name in configs:
            rate = statistics.median(rates[f"{kind} {name}"])
            print(f"  loader {name:7s} {rate:8.1f} {unit}/s  ({rate / base:4.2f}x of no augmentation, "
                  f"{rate / step:5.1f}x the step's rate)")
        model = "FreMAE ViT-tiny (4 blocks)" if kind == "2D" else "Med-Tuning ViT-tiny (4 blocks) segmenter"
        print(f"  step   {model}: {step:8.1f} {unit}/s consumed (forward + backward + Adam, this CPU)")


if __name__ == "__main__":
    main()
