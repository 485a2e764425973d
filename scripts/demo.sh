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
step "1/9 generate a BraTS-like dataset in $DATA"
medtune data synth --out "$DATA" --cases 6 --shape 64 64 48 --seed 0

step "2/9 check the dataset (files, shapes, labels, NaN/Inf)"
medtune data check "$DATA"

# --- 2. self-supervised pretraining: FreMAE on a tiny ViT, 2 CPU processes through Accelerate
# ACCELERATE_USE_CPU=true with --multi_gpu gives two synchronised CPU processes (gloo);
# --cpu alone would silently run one. Global batch: 8 slices x 2 processes.
step "3/9 pretrain FreMAE (configs/demo_pretrain.yaml) with 2 Accelerate CPU processes"
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

# --- 3. Med-Tuning: the pretrained ViT frozen, Med-Adapters + UperNet trained on labels
FINETUNE="$OUT/finetune"
step "4/9 finetune with Med-Tuning adapters (configs/demo_finetune.yaml), validating Dice ET/TC/WT"
if [[ -f "$FINETUNE/model.safetensors" ]]; then
    echo "already finetuned: $FINETUNE (delete it to finetune again)"
else
    RESUME=()
    [[ -d "$FINETUNE/state" ]] && RESUME=(--resume latest)
    medtune finetune --config configs/demo_finetune.yaml --data "$DATA" --backbone "$PRETRAIN" \
        --output "$FINETUNE" "${RESUME[@]}"
fi

# --- 4. predict NIfTI label maps (input affine/header, labels 1/2/4) and score them
step "5/9 predict label maps for every case (sliding window over whole volumes)"
medtune predict --model "$FINETUNE" --input "$DATA" --output "$OUT/predictions" --overwrite  # the demo's own earlier ones

step "6/9 evaluate Dice and HD95 for ET, TC, WT (BraTS rules for empty regions)"
medtune evaluate --pred "$OUT/predictions" --gt "$DATA" --csv "$OUT/scores.csv"

# --- 5. export: adapter-only (trained tensors, peft spirit) and the full model
step "7/9 export safetensors: adapter-only and full"
rm -rf "$OUT/export"  # exports never overwrite: write them anew on every demo run
medtune export "$FINETUNE" --format adapter --out "$OUT/export/adapter" --copy-base
medtune export "$FINETUNE" --format full --out "$OUT/export/full"
du -h "$OUT"/export/*/*.safetensors

# --- 6. the parameter table: every method on the demo backbone
step "8/9 compare PETL methods: parameters, trained-weights size, FLOPs per volume"
medtune params --backbone vit_tiny_patch16_224 --in-chans 4 --img-size 64 --slices 48 \
    --option depth=4 --decoder-option channels=32 \
    --methods full,decoder-only,lora,adaptformer,st-adapter,vpt,med-tuning --plot "$OUT/params.png"

# --- 7. vision-language on generated data: CM-MaskSD referring segmentation, MF2-MVQA
step "9/9 vision-language: referring segmentation with CM-MaskSD, then medical VQA with MF2-MVQA"
medtune data synth --kind referring --out "$OUT/shapes"
if [[ ! -f "$OUT/referring/model.safetensors" ]]; then
    RESUME=()
    [[ -d "$OUT/referring/state" ]] && RESUME=(--resume latest)
    medtune finetune --config configs/demo_referring.yaml --data "$OUT/shapes" --output "$OUT/referring" \
        --self-distill "${RESUME[@]}"
fi
medtune predict --model "$OUT/referring" --input "$OUT/shapes/referring.jsonl" --output "$OUT/referring/predictions" \
    --overwrite
medtune data synth --kind vqa --out "$OUT/vqa_data"
if [[ ! -f "$OUT/vqa/model.safetensors" ]]; then
    RESUME=()
    [[ -d "$OUT/vqa/state" ]] && RESUME=(--resume latest)
    medtune finetune --config configs/demo_vqa.yaml --data "$OUT/vqa_data" --output "$OUT/vqa" "${RESUME[@]}"
fi
medtune predict --model "$OUT/vqa" --input "$OUT/vqa_data" --output "$OUT/vqa/predictions" --overwrite

step "done"
echo "pretrained encoder    $PRETRAIN/backbone.safetensors (figure: $PRETRAIN/reconstruction.png)"
echo "Med-Tuning run        $FINETUNE (best weights in $FINETUNE/best/)"
echo "label maps, scores    $OUT/predictions, $OUT/scores.csv"
echo "exports               $OUT/export/adapter, $OUT/export/full"
echo "parameter chart       $OUT/params.png"
echo "referring / VQA runs  $OUT/referring, $OUT/vqa"
