#!/usr/bin/env bash
# Data-parallel scaling on one multi-GPU node (issues [J] item 5 and [L]): the same training-step
# benchmark on 1, 2, 4, ... GPUs (one rank per GPU, NCCL, sharded optimizer), then the scaling
# efficiency tok/s(N) / (N x tok/s(1)).
#   usage (device tool, carry .whl; add the fa4 PYTHONPATH when flash-attn-4 is installed):
#     bash launch/gpu/scaling.sh "1 2 4 8" model=d24 hardware.device_batch_size=16 precision=fp8
#   The first argument lists the GPU counts; the rest are chatlm.bench overrides for every run.
#   Results of several calls (e.g. bf16 in one, fp8 in the next): python3 launch/gpu/scaling_summary.py DIR1/bench_*.json DIR2/bench_*.json
set -uo pipefail
counts=$1; shift
runs=()
for n in $counts; do
  runs+=("hardware.nproc_per_node=$n total_batch_size=${TOTAL_BATCH:-524288} steps=${STEPS:-12} warmup_steps=${WARMUP:-4} $*")
done
bash "$(dirname "$0")/bench.sh" "${runs[@]}"
OUT=${OUT:-/tmp/out}
# efficiency per configuration; for results of several calls run it locally on all their files
python3 "$(dirname "$0")/scaling_summary.py" --json "$OUT/scaling.json" "$OUT"/bench_*.json
