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

    python benchmarks/data_loading.py                 # ~20 s on 2 cores
    python benchmarks/data_loading.py --shape 160 160 128 --cases 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from medtune.data import VolumeCache, crop_foreground, find_cases, load_case, synthesize_brats, zscore_nonzero


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96))
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=96, help="2D window side")
    parser.add_argument("--crop", type=int, default=64, help="3D crop side")
    parser.add_argument("--rounds", type=int, default=5)
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


if __name__ == "__main__":
    main()
