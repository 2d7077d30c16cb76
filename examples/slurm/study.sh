#!/usr/bin/env bash
# Run a study (megatron_edl.demo.study: arms x seeds on the quickstart's data) as Slurm jobs: one
# job builds the shared corpus, tokenizer and data, a job array trains and evaluates one arm x seed
# per task (CPU nodes: the quickstart's runs use --cpu), a last job writes the report.
#
#   bash examples/slurm/study.sh STUDY.yaml WORKDIR [extra sbatch flags]
#
# Every stage leaves a stamp in WORKDIR: re-running the script resumes (finished runs are reused).
# WORKDIR must be on a file system all nodes share.
set -euo pipefail

STUDY=${1:?usage: study.sh STUDY.yaml WORKDIR [extra sbatch flags]}
WORKDIR=${2:?usage: study.sh STUDY.yaml WORKDIR [extra sbatch flags]}
shift 2
SBATCH=(sbatch --parsable --nodes 1 --ntasks 1 --cpus-per-task "${CPUS_PER_TASK:-8}" "$@")
STUDY_CMD=(python -m megatron_edl.demo.study "$STUDY" --workdir "$WORKDIR")

runs=$("${STUDY_CMD[@]}" --list | wc -l)
[[ $runs -gt 0 ]] || { echo "error: $STUDY has no runs" >&2; exit 1; }
mkdir -p "$WORKDIR/slurm"
log="$WORKDIR/slurm/%x-%A_%a.out"

prepare=$("${SBATCH[@]}" --job-name study-prepare --output "$log" \
    --wrap "$(printf '%q ' "${STUDY_CMD[@]}") --prepare")
array=$("${SBATCH[@]}" --job-name study-run --output "$log" --array "0-$((runs - 1))" \
    --dependency "afterok:$prepare" --wrap "$(printf '%q ' "${STUDY_CMD[@]}") --run")
report=$("${SBATCH[@]}" --job-name study-report --output "$log" \
    --dependency "afterok:$array" --wrap "$(printf '%q ' "${STUDY_CMD[@]}") --report")
echo "[study] $runs runs: prepare $prepare, array $array, report $report (logs: $WORKDIR/slurm)"
