#!/usr/bin/env bash
# Submit a config and its baseline twin (EDL off, same model, data and seed) as two jobs.
#
#   bash examples/slurm/compare.sh examples/configs/moe_8b_a0.8b.yaml 4 [extra Megatron flags]
#
# The twin is <config>_baseline.yaml next to the config; each run gets its own RUN_DIR.
set -euo pipefail

CONFIG=${1:?usage: compare.sh CONFIG.yaml NODES [extra Megatron flags]}
NODES=${2:?usage: compare.sh CONFIG.yaml NODES [extra Megatron flags]}
shift 2
BASELINE=${CONFIG%.yaml}_baseline.yaml
[[ -f $BASELINE ]] || { echo "error: no baseline twin $BASELINE" >&2; exit 1; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

for config in "$CONFIG" "$BASELINE"; do
    name=$(basename "$config" .yaml)
    RUN_DIR=${RUNS_ROOT:-runs}/$name sbatch --nodes "$NODES" --job-name "$name" \
        --export=ALL "$HERE/pretrain.sbatch" "$config" "$@"
done
