#!/usr/bin/env bash
# nanochat's reference run on one node of 8 GPUs, from nothing to a chat model and a report card:
# ClimbMix download -> 32K tokenizer -> d24 fp8 pretraining (ratio 8) -> CORE -> SFT (SmolTalk,
# MMLU aux, GSM8K) -> chat evals -> a sample answer -> report.md. Needs internet (shards, the SFT
# mixture). About 1 h 40 min on 8xH100 for the pretraining (5.8B tokens at the measured one-GPU
# d24 fp8 rate) plus ~30 min for the downloads, evals and SFT (estimates; docs/pipelines.md).
#   bash launch/speedrun.sh                                   # outputs/pipelines/speedrun/
#   bash launch/speedrun.sh --var hardware_args=hardware=h200x8 --with rl
#   sbatch launch/slurm/speedrun.sbatch                       # the same inside one Slurm allocation
# Re-running the same command skips the completed stages and resumes an interrupted one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash launch/setup.sh
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m chatlm.cli pipeline run speedrun "$@"
