#!/usr/bin/env bash
# Tiny MoE GPT pre-training through Megatron's own training loop (megatron.training.pretrain) on
# CPU with gloo: 2 processes, expert parallelism 2 (alltoall dispatcher), mock data.
#
# Usage: bash examples/pretrain_tiny_moe_cpu.sh [extra Megatron flags]
# (`make demo` runs it inside the project's virtual environment.)
set -euo pipefail

NPROC=${NPROC:-2}
OUT_DIR=${OUT_DIR:-runs/tiny_moe_cpu}
mkdir -p "$OUT_DIR"

MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 512
    --seq-length 128 --max-position-embeddings 128
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
)
MOE_ARGS=(
    --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 256
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall --expert-model-parallel-size 2
)
DATA_ARGS=(
    --mock-data --tokenizer-type NullTokenizer --vocab-size 1024 --split 100,0,0 --num-workers 0
)
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size 8 --train-iters 50
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 5
    --weight-decay 0.01 --clip-grad 1.0 --seed 1234
    --log-interval 5 --eval-iters 0 --eval-interval 1000
    --save "$OUT_DIR/checkpoints" --save-interval 50
)

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES="" \
torchrun --nproc-per-node "$NPROC" -m megatron_edl.pretrain_gpt --cpu \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@" \
    2>&1 | tee "$OUT_DIR/train.log" | grep --line-buffered -E " iteration |Error|error:|saved checkpoint"
status=${PIPESTATUS[0]}
echo "[demo] exit status $status; full log: $OUT_DIR/train.log; checkpoint: $OUT_DIR/checkpoints"
exit "$status"
