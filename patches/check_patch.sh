#!/usr/bin/env bash
# Check that the megatron-edl patch applies to a Megatron-LM checkout (nothing is modified).
#
#   bash patches/check_patch.sh /path/to/Megatron-LM
#
# Exit status 0: the patch applies cleanly; 1: it does not (the reason is printed).
set -euo pipefail

MLM=${1:?usage: check_patch.sh /path/to/Megatron-LM}
PATCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/megatron-lm-core_v0.19.0-pretrain_gpt.patch
[[ -f $MLM/pretrain_gpt.py ]] || { echo "error: $MLM/pretrain_gpt.py not found" >&2; exit 1; }
if patch --dry-run --batch --forward -p1 -d "$MLM" < "$PATCH" >/dev/null; then
    echo "ok: $(basename "$PATCH") applies to $MLM/pretrain_gpt.py"
else
    echo "error: $(basename "$PATCH") does not apply to $MLM/pretrain_gpt.py" >&2
    patch --dry-run --batch --forward -p1 -d "$MLM" < "$PATCH" >&2 || true
    exit 1
fi
