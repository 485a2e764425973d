"""Data loading: what the volume cache saves, measured side by side in one run.

Writes a few synthetic BraTS cases, builds a :class:`~medtune.data.VolumeCache`, then
times, in interleaved rounds (each round runs every variant once, in rotated order,
so drifting machine load hits all alike; ratios are medians of per-round ratios):

- ``decode`` vs ``cache``: reading one whole case from ``.nii.gz`` with
  :func:`load_case` + z-score + crop, against reading the cached memory map;
- ``slice C`` vs ``slice F``: one 2D training window (all modalities, slice axis last)
  from a C-ordered copy of the cached image against the Fortran-ordered cache file
  medtune writes (a slice is one contiguous block there);
- ``crop C`` vs ``crop F``: the same for a 3D crop.

Then the three ways to feed pretraining (``data.cache_format: npy | compressed``,
``data.stream: true``), side by side: bytes on disk per case (the cache's files; the
stream keeps none), cache build time per case, 2D training slices/s and 3D crops/s read
through medtune's datasets (cache modes: random items of a warm cache; stream: an epoch
in stream order, decoding every case from ``.nii.gz`` as it goes), and the first-batch
latency of a fresh dataset + loader (cache modes: the cache already built).

    python benchmarks/data_loading.py                 # ~40 s on 2 cores
    python benchmarks/data_loading.py --shape 240 240 155 --cases 2   # BraTS-sized cases
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

import torch
from torch.utils.data import DataLoader

from medtune.data import (
    DataConfig,
    VolumeCache,
    build_pretrain_data,
    crop_foreground,
    find_cases,
    load_case,
    synthesize_brats,
    zscore_nonzero,
)


def timed(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict[str, list[float]]:
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(variants[name], repeats))
    return times


def items_per_s(dataset, count: int, seed: int = 0) -> float:
    """Random items of a map-style dataset per second."""
    picks = np.random.default_rng(seed).integers(0, len(dataset), count)
    start = time.perf_counter()
    for index in picks:
        dataset[int(index)]
    return count / (time.perf_counter() - start)


def stream_per_s(stream) -> float:
    """A whole epoch of a stream, in its order, per second."""
    stream.set_epoch(0)
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return count / (time.perf_counter() - start)


def first_batch(make: Callable[[], object], batch_size: int) -> float:
    """Seconds from nothing to the first batch: the dataset (cache checked, not built) and a loader."""
    start = time.perf_counter()
    dataset = make()
    shuffle = not isinstance(dataset, torch.utils.data.IterableDataset)
    next(iter(DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)))
    return time.perf_counter() - start


def compare_modes(root: Path, tmp: Path, args: argparse.Namespace) -> str:
    """The npy cache, the compressed cache and the stream, as pretraining reads them."""
    cases = find_cases(root)
    s, c = args.img_size, args.crop
    rows = []
    for mode in ("npy", "compressed", "stream"):
        config = dict(root=str(root), img_size=s, crop_size=[c, c, c], augment=None, num_workers=2)
        if mode == "stream":
            config.update(stream=True, samples_per_volume=args.stream_samples, stream_buffer=64)
        else:
            config.update(cache_format=mode, cache_dir=str(tmp / f"cache-{mode}"))
        start = time.perf_counter()
        build_pretrain_data(DataConfig(**config), show_progress=False)  # builds a cache mode's cache
        build = (time.perf_counter() - start) / len(cases)
        folder = tmp / f"cache-{mode}"
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / len(cases) if mode != "stream" else 0
        # read through the datasets pretraining gets (the cache is the one just built)
        slices = build_pretrain_data(DataConfig(**config, mode="2d"), show_progress=False)[0]
        crops = build_pretrain_data(DataConfig(**config, mode="3d"), show_progress=False)[0]
        if mode == "stream":
            slices_s, crops_s = stream_per_s(slices), stream_per_s(crops)
        else:
            slices_s, crops_s = items_per_s(slices, args.reads), items_per_s(crops, args.reads // 10)
        latency = first_batch(lambda: build_pretrain_data(DataConfig(**config), show_progress=False)[0], 8)
        rows.append((mode, disk, build if mode != "stream" else 0.0, slices_s, crops_s, latency))
    raw = rows[0][1]
    lines = [f"pretraining data modes, {len(cases)} generated cases (not real MRI: compression ratios differ on real scans):",
             f"  {'mode':11s} {'disk/case':>12s} {'vs npy':>7s} {'build s/case':>12s} {'slices/s':>9s} "
             f"{'crops/s':>8s} {'first batch':>11s}"]
    for mode, disk, build, slices_s, crops_s, latency in rows:
        vs = f"{raw / disk:6.2f}x" if disk else "     -"
        size = f"{disk / 1e6:9.2f} MB" if disk else "0 (no cache)"
        lines.append(f"  {mode:11s} {size:>12s} {vs:>7s} {build:12.2f} {slices_s:9.0f} {crops_s:8.1f} {latency * 1e3:8.0f} ms")
    lines.append(f"  (slices {s}x{s}, crops {c}^3, batch 8; stream: {args.stream_samples} samples per case per epoch, "
                 "each case decoded from .nii.gz when read, 2 read-ahead threads)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96))
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=96, help="2D window side")
    parser.add_argument("--crop", type=int, default=64, help="3D crop side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reads", type=int, default=400, help="2D items read per cache mode (3D: a tenth)")
    parser.add_argument("--stream-samples", type=int, default=16, help="stream: samples per case per epoch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        synthesize_brats(root, cases=args.cases, shape=tuple(args.shape))
        cases = find_cases(root)
        cache = VolumeCache(cases, cache_dir, show_progress=False)
        image_f = cache.load(0).image  # (M, h, w, d), Fortran order, memory-mapped
        np.save(Path(tmp) / "c.npy", np.ascontiguousarray(image_f))
        image_c = np.load(Path(tmp) / "c.npy", mmap_mode="r")
        _, h, w, d = image_f.shape
        rng = np.random.default_rng(0)
        s, c = min(args.img_size, h, w), min(args.crop, h, w, d)

        def decode() -> object:
            image = load_case(cases[0]).image
            return zscore_nonzero(crop_foreground(image)[0])

        def read_cache() -> object:
            return np.asarray(cache.load(0).image) + 0  # force a full read

        def window2d(image: np.ndarray) -> Callable[[], object]:
            def read() -> object:
                y, x, z = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1), rng.integers(0, d)
                return np.array(image[:, y:y + s, x:x + s, z])
            return read

        def window3d(image: np.ndarray) -> Callable[[], object]:
            def read() -> object:
                y, x, z = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1), rng.integers(0, d - c + 1)
                return np.array(image[:, y:y + c, x:x + c, z:z + c])
            return read

        modes_table = compare_modes(root, Path(tmp), args)
        whole = interleaved({"decode": decode, "cache": read_cache}, args.rounds, 2)
        slices = interleaved({"slice C": window2d(image_c), "slice F": window2d(image_f)}, args.rounds, 200)
        crops = interleaved({"crop C": window3d(image_c), "crop F": window3d(image_f)}, args.rounds, 20)

    def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(times[slow], times[fast]))

    print(f"case {tuple(args.shape)} x4 modalities, cropped to {(h, w, d)}; {args.rounds} interleaved rounds")
    for times in (whole, slices, crops):
        for name, values in times.items():
            print(f"  {name:8s} {statistics.median(values) * 1e3:9.3f} ms")
    print(f"cache read vs nii.gz decode+preprocess: {ratio(whole, 'decode', 'cache'):.1f}x faster")
    print(f"2D window {s}x{s}: Fortran-order cache vs C order: {ratio(slices, 'slice C', 'slice F'):.1f}x faster")
    print(f"3D crop {c}^3: Fortran-order cache vs C order: {ratio(crops, 'crop C', 'crop F'):.2f}x faster")
    print(modes_table)


if __name__ == "__main__":
    main()
