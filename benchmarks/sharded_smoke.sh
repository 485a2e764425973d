#!/usr/bin/env bash
# The sharded engines on a GPU machine, in one command (they need CUDA: Accelerate engages
# FSDP and DeepSpeed only on GPUs; the CPU suite tests torch's FSDP2 through medtune's loop).
#
#   bash benchmarks/sharded_smoke.sh [OUT_DIR]      # with .venv/bin on PATH; pip install deepspeed for ZeRO
#
# Runs the demo recipes for a few steps under FSDP2 (pretraining and Med-Tuning finetuning),
# ZeRO-2 (LoRA finetuning) and ZeRO-3 (full finetuning), each resumed once, and prints
# one line per run: engine, steps, seconds, and whether the weights and resume came out.
set -uo pipefail
OUT="${1:-checkpoints/sharded_smoke}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
rm -rf "$OUT" && mkdir -p "$OUT"
medtune data synth --out "$OUT/data" --cases 6 --shape 64 64 48 > /dev/null

run() {  # run NAME CONFIG COMMAND...
    local name=$1 config=$2; shift 2
    local start=$SECONDS
    if accelerate launch --config_file "configs/accelerate/$config" --num_processes "$GPUS" -m medtune "$@" \
        --output "$OUT/$name" > "$OUT/$name.log" 2>&1 \
       && accelerate launch --config_file "configs/accelerate/$config" --num_processes "$GPUS" -m medtune "$@" \
        --output "$OUT/$name" --resume latest --set train.max_steps=6 >> "$OUT/$name.log" 2>&1; then
        printf '%-22s %-16s ok      %4ds  %s\n' "$name" "$config" $((SECONDS - start)) "$(ls "$OUT/$name" | tr '\n' ' ')"
    else
        printf '%-22s %-16s FAILED  %4ds  (see %s)\n' "$name" "$config" $((SECONDS - start)) "$OUT/$name.log"
    fi
}

STEPS=(--set train.max_steps=4 train.save_every=2 train.log_every=1)
run pretrain_fsdp2 fsdp2_vit.yaml pretrain --config configs/demo_pretrain.yaml --data "$OUT/data" "${STEPS[@]}"
run medtuning_fsdp2 fsdp2_vit.yaml finetune --config configs/demo_finetune.yaml --data "$OUT/data" "${STEPS[@]}"
run lora_zero2 zero2.yaml finetune --config configs/demo_finetune_lora.yaml --data "$OUT/data" "${STEPS[@]}"
run full_zero3 zero3.yaml finetune --config configs/demo_finetune.yaml --data "$OUT/data" "${STEPS[@]}" \
    "adapter={method: full}"
