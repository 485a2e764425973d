#!/usr/bin/env bash
# Every GPU benchmark of issue 16 in one command, within a time budget (8 minutes by
# default), ending with one table; each command's full output stays in the results folder.
#
#   bash benchmarks/gpu_suite.sh                          # on a GPU: cuda, bf16, full sizes
#   bash benchmarks/gpu_suite.sh --device cpu --tiny      # the CPU dry run: tiny sizes, same commands
#   bash benchmarks/gpu_suite.sh --out results/gpu-$(date +%F) --budget 480   # seconds in all
#
# What runs (in this order; the first rows are the ones a short slot must not lose):
#   1. pretrain_throughput.py --device cuda --bf16, ViT-B/16 at 128 px, batch 64: FreMAE,
#      FreMAE-pixel, MAE, SimMIM, MFM, eager;
#   2. finetune_cost.py --device cuda --bf16, ViT-B/16, 2 x 4 x 128 x 128 x 32: full, LoRA,
#      Med-Tuning, Med-Tuning checkpointed, eager;
#   3. profile_step.py --device cuda --bf16 --vit-b: top operators of a FreMAE and a Med-Tuning step;
#   4. pretrain_throughput.py as 1 with --compile: every variant eager and compiled;
#   5. finetune_cost.py as 2 for full and Med-Tuning compiled.
# Each command gets a timeout (its own, capped by what is left of the budget); one that
# fails or times out is marked in the table and the suite goes on. The exit status is
# 0 when every command succeeded, 1 otherwise.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python).

set -euo pipefail

DEVICE=cuda
TINY=0
BUDGET=""
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
# Measure this checkout, whatever medtune the interpreter has installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/suite-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
ROWS="$OUT/rows.jsonl"
STATUS="$OUT/status.tsv"
: > "$ROWS"
: > "$STATUS"

if [[ "$DEVICE" == cuda* ]]; then
    BF16=(--bf16)
else
    BF16=()
fi
if [[ "$TINY" == 1 ]]; then
    # Same commands at toy sizes: checks the suite's plumbing in a minute or two on a CPU.
    PRETRAIN=(--backbone vit_tiny_patch16_224 --img-size 32 --depth 4 --batch 2 --rounds 1 --steps 1)
    COMPILED_VARIANTS=(fremae)
    FINETUNE=(--backbone vit_tiny_patch16_224 --depth 4 --img-size 32 --slices 4 --batch 1 --steps 1)
    PROFILE=(--tiny --repeats 1 --batch 2)
    T_PRETRAIN=600; T_FINETUNE=600; T_PROFILE=300; T_PRETRAIN_C=600; T_FINETUNE_C=600
    BUDGET="${BUDGET:-2400}"  # a shared CPU is slow; the GPU run keeps its 8 minutes
else
    PRETRAIN=(--backbone vit_base_patch16_224 --img-size 128 --depth 12 --batch 64 --rounds 3 --steps 5)
    COMPILED_VARIANTS=(fremae fremae-pixel mae simmim mfm)
    FINETUNE=(--backbone vit_base_patch16_224 --img-size 128 --slices 32 --batch 2 --steps 5)
    PROFILE=(--vit-b --batch 64 --repeats 3)
    T_PRETRAIN=90; T_FINETUNE=90; T_PROFILE=60; T_PRETRAIN_C=240; T_FINETUNE_C=150
    BUDGET="${BUDGET:-480}"
fi

START=$(date +%s)
FAILED=0

# run NAME TIMEOUT_S COMMAND...: output to $OUT/NAME.log, status to $STATUS.
run() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < 20 )); then
        printf '%s\tskipped (budget spent)\t0\n' "$name" >> "$STATUS"
        FAILED=1
        return 0
    fi
    (( limit > left )) && limit=$left
    echo "== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
    local began rc=0
    began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1 || rc=$?
    local took=$(( $(date +%s) - began ))
    local verdict="ok"
    if (( rc == 124 || rc == 137 )); then verdict="timed out after ${limit}s"; FAILED=1
    elif (( rc != 0 )); then verdict="failed (exit $rc)"; FAILED=1; fi
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$took" >> "$STATUS"
    echo "   $verdict in ${took}s"
    return 0
}

run pretrain-eager "$T_PRETRAIN" "$PYTHON" benchmarks/pretrain_throughput.py --device "$DEVICE" ${BF16[@]+"${BF16[@]}"} \
    "${PRETRAIN[@]}" --json "$ROWS"
run finetune-eager "$T_FINETUNE" "$PYTHON" benchmarks/finetune_cost.py --device "$DEVICE" ${BF16[@]+"${BF16[@]}"} \
    "${FINETUNE[@]}" --methods full,lora,med-tuning,med-tuning+gc --json "$ROWS"
run profile "$T_PROFILE" "$PYTHON" benchmarks/profile_step.py --device "$DEVICE" ${BF16[@]+"${BF16[@]}"} \
    "${PROFILE[@]}" --rows 10
run pretrain-compiled "$T_PRETRAIN_C" "$PYTHON" benchmarks/pretrain_throughput.py --device "$DEVICE" \
    ${BF16[@]+"${BF16[@]}"} "${PRETRAIN[@]}" --variants "${COMPILED_VARIANTS[@]}" --compile --json "$OUT/compiled.jsonl"
run finetune-compiled "$T_FINETUNE_C" "$PYTHON" benchmarks/finetune_cost.py --device "$DEVICE" ${BF16[@]+"${BF16[@]}"} \
    "${FINETUNE[@]}" --methods full,med-tuning+compile --json "$OUT/compiled.jsonl"

# Compiled runs repeat the eager rows for their ratios: keep only their compiled rows.
if [[ -s "$OUT/compiled.jsonl" ]]; then
    grep '+compile"' "$OUT/compiled.jsonl" >> "$ROWS" || true
fi

"$PYTHON" - "$ROWS" "$STATUS" "$(( $(date +%s) - START ))" <<'EOF' | tee "$OUT/table.md"
import json, sys

rows_path, status_path, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in open(rows_path) if line.strip()]


def number(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


print(f"\n| benchmark | row | rate | vs | GFLOP/step | GFLOP/s | of peak | peak MiB |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rate = f"{r['slices_s']:.1f} slices/s" if "slices_s" in r else f"{r['step_s']:.3f} s/step"
    print(f"| {r['benchmark']} | {r['row']} | {rate} | {r['ratio']:.2f}x {r['vs']} | {number(r['gflop_step'], '.1f')} "
          f"| {number(r['gflop_s'], '.1f')} | {number(None if r['of_peak'] is None else 100 * r['of_peak'], '.1f', '%')} "
          f"| {number(r['peak_mib'], '.0f')} |")
print(f"\n| command | status | seconds |\n|---|---|---:|")
for line in open(status_path):
    name, verdict, took = line.rstrip("\n").split("\t")
    print(f"| {name} | {verdict} | {took} |")
devices = sorted({r["device"] for r in rows})
print(f"\n{len(rows)} rows on {', '.join(devices) or 'no device'} in {seconds} s; "
      "pretraining ratios: slices/s over FreMAE's (higher is faster); finetuning: step time over full's")
EOF
echo "results in $OUT (table.md, rows.jsonl, one log per command)"
exit "$FAILED"
