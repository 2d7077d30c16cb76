#!/usr/bin/env bash
# Tiny MoE GPT pre-training through Megatron's own training loop (megatron.training.pretrain) on
# CPU with gloo: 2 processes, expert parallelism 2 (alltoall dispatcher), labelled mock data,
# EDL on (config: examples/configs/tiny_moe_cpu.yaml; baseline twin: CONFIG=...baseline.yaml).
#
# Usage: bash examples/pretrain_tiny_moe_cpu.sh [extra Megatron flags]
set -euo pipefail

NPROC=${NPROC:-2}
CONFIG=${CONFIG:-examples/configs/tiny_moe_cpu.yaml}
OUT_DIR=${OUT_DIR:-runs/tiny_moe_cpu}
mkdir -p "$OUT_DIR"

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES="" \
torchrun --nproc-per-node "$NPROC" -m megatron_edl.pretrain_gpt --cpu \
    --config-yaml "$CONFIG" --save "$OUT_DIR/checkpoints" --save-interval 50 "$@" \
    2>&1 | tee "$OUT_DIR/train.log" \
    | grep --line-buffered -E " iteration | validation loss|Error|error:|saved checkpoint"
status=${PIPESTATUS[0]}
echo "[demo] exit status $status; full log: $OUT_DIR/train.log; checkpoint: $OUT_DIR/checkpoints"
exit "$status"
