"""What ``train.tune_host_allocator`` buys on a CPU: glibc's malloc defaults vs medtune's setting.

Both settings are process-wide (glibc reads them when a process starts, or from
``mallopt``), so each measurement is a child process running
``benchmarks/pretrain_throughput.py`` for one round, with ``--host-allocator default``
or ``tuned``; the children alternate (the order rotates every round), so drifting
machine load hits both alike. Printed: the median slices/s of every pretraining
objective under each setting and the median of the per-round ratios tuned / default.

    python benchmarks/host_allocator.py                  # tiny ViT, ~3 min on 2 cores
    python benchmarks/host_allocator.py --rounds 5 --threads 2 -- --backbone vit_base_patch16_224 \\
        --img-size 128 --depth 12 --batch 8              # extra arguments go to pretrain_throughput.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("default", "tuned")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per objective per child (default 6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    parser.add_argument("--variants", nargs="+", default=["fremae", "mae", "simmim"])
    parser.add_argument("extra", nargs="*", help="more pretrain_throughput.py arguments, after --")
    args = parser.parse_args()

    rates: dict[str, dict[str, list[float]]] = {s: {} for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            order = SETTINGS if index % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                rows = Path(tmp) / f"{setting}-{index}.jsonl"
                command = [sys.executable, str(HERE / "pretrain_throughput.py"), "--rounds", "1",
                           "--steps", str(args.steps), "--threads", str(args.threads), "--variants", *args.variants,
                           "--host-allocator", setting, "--json", str(rows), *args.extra]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    print(f"host_allocator: pretrain_throughput.py failed ({setting}, round {index})", file=sys.stderr)
                    return 1
                for line in rows.read_text().splitlines():
                    row = json.loads(line)
                    rates[setting].setdefault(row["row"], []).append(row["slices_s"])
                device = row["device"]
    print(f"{' '.join(args.extra) or 'tiny ViT (pretrain_throughput.py defaults)'}; {device}; "
          f"{args.rounds} rounds x {args.steps} steps, one child process per setting per round")
    print(f"{'variant':>10}  {'default':>9}  {'tuned':>9}  {'tuned/default':>13}   (slices/s)")
    for name in rates["default"]:
        default, tuned = rates["default"][name], rates["tuned"][name]
        ratio = statistics.median(t / d for t, d in zip(tuned, default))
        rounds = "  ".join(f"{d:.1f}/{t:.1f}" for d, t in zip(default, tuned))
        print(f"{name:>10}  {statistics.median(default):9.1f}  {statistics.median(tuned):9.1f}  {ratio:13.2f}"
              f"   per round {rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
