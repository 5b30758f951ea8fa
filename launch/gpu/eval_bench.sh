#!/usr/bin/env bash
# [F] on one GPU: CORE and MMLU examples/s, batched vs one example per forward, d20 (fresh init,
# bf16, the inference backend: fa4 if installed, else sdpa), two batch budgets, GSM8K generation;
# and whether per-example results differ between the two ways of batching.
#   usage (device tool; carry .gpucache):  bash launch/gpu/eval_bench.sh [head_ab]
#   .gpucache/evals: `chatlm fetch evals` output, each file cut to its first 1,500 lines;
#   .gpucache/tok32k: a 32K BPE trained on those texts (the device has no rustbpe).
# Writes $OUT/eval_bench_*.json and eval_bench.log.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
B=.gpucache/evals
TASKS=hellaswag,arc_easy,winogrande,lambada_openai,bigbench_operators,squad
bench() {  # tag args...
  local tag=$1; shift
  echo "=== $tag: $*" | tee -a "$OUT/eval_bench.log"
  ${LIMIT:+timeout $LIMIT} python3 launch/bench_eval.py "$OUT/eval_bench_$tag.json" --depth 20 --tokenizer-dir .gpucache/tok32k \
    --bundle $B/core --chat-dir $B --tasks $TASKS --examples ${EXAMPLES:-512} "$@" 2>&1 | tee -a "$OUT/eval_bench.log"
}
if [ "${1:-}" = head_ab ]; then  # the two head paths, same machine, same budget
  TASKS=hellaswag,winogrande
  EXAMPLES=256 bench span --batch-size 64 --max-batch-tokens 16384 --head span
  EXAMPLES=256 bench full --batch-size 64 --max-batch-tokens 16384 --head full
  exit
fi
bench b64 --batch-size 64 --max-batch-tokens 16384 --gen-examples 64 --new-tokens 128
bench b256 --batch-size 256 --max-batch-tokens 65536
