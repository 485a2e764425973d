#!/usr/bin/env bash
# medtune end to end on a laptop CPU, in a few minutes, with generated data.
#
#   make demo                        # output in checkpoints/demo
#   bash scripts/demo.sh OUT_DIR     # with .venv/bin on PATH
#
# Each step is one `medtune` command; later steps read what earlier ones wrote.
# Re-running reuses finished steps (delete OUT_DIR to start over).
set -euo pipefail

OUT="${1:-checkpoints/demo}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p "$OUT"
DATA="$OUT/data"
PRETRAIN="$OUT/pretrain"

step() { printf '\n=== %s\n' "$*"; }

# --- 1. data: a small BraTS-2020-style set (4 modalities + labels, NIfTI), then check it
step "1/3 generate a BraTS-like dataset in $DATA"
medtune data synth --out "$DATA" --cases 6 --shape 64 64 48 --seed 0

step "2/3 check the dataset (files, shapes, labels, NaN/Inf)"
medtune data check "$DATA"

# --- 2. self-supervised pretraining: FreMAE on a tiny ViT, 2 CPU processes through Accelerate
# ACCELERATE_USE_CPU=true with --multi_gpu gives two synchronised CPU processes (gloo);
# --cpu alone would silently run one. Global batch: 8 slices x 2 processes.
step "3/3 pretrain FreMAE (configs/demo_pretrain.yaml) with 2 Accelerate CPU processes"
if [[ -f "$PRETRAIN/backbone.safetensors" ]]; then
    echo "already pretrained: $PRETRAIN (delete it to pretrain again)"
else
    RESUME=()
    if [[ -d "$PRETRAIN/state" ]]; then
        RESUME=(--resume latest)  # an interrupted earlier demo: continue where it stopped
    fi
    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch \
        --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        -m medtune pretrain --config configs/demo_pretrain.yaml --data "$DATA" --output "$PRETRAIN" \
        --set train.batch_size=8 "${RESUME[@]}"
fi
echo "pretrained encoder: $PRETRAIN/backbone.safetensors (config: $PRETRAIN/config.json)"
echo "reconstruction figure: $PRETRAIN/reconstruction.png"

# --- later steps (finetune with Med-Tuning, evaluate, export, params) are appended here
