#!/usr/bin/env bash
# [S] on one GPU: launch/bench_serve.py for a d20-shaped model (random weights, bf16): requests/s,
# output tok/s and TTFT p50/p99 of `python -m chatlm.serve` with 1, 8 and 32 concurrent streaming
# clients, and the engine's own batch-32 decode rate on the same model (the served/engine ratio).
#   usage (device tool, carry .whl):  bash launch/gpu/serve_bench.sh ["extra bench_serve.py args"]
#   e.g. a trained checkpoint instead (carried too):  bash launch/gpu/serve_bench.sh "--ckpt outputs/sft/latest"
#   .whl: what infer_bench.sh needs (hydra-core 1.3.8, omegaconf 2.3.0, antlr4-python3-runtime 4.9.3,
#   hydra-submitit-launcher 1.2.0, submitit) plus the serve extra and its dependencies, for the GPU
#   machine's Python, e.g. pip download -d .whl --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 fastapi uvicorn pydantic   (starlette, pydantic-core, anyio, h11, click...)
# The random model's vocabulary comes from a 32K tokenizer: $TOKENIZER_DIR, else .gpucache/tok32k (as
# eval_bench.sh carries it), else one trained here on the embedded corpus (needs rustbpe, which the
# device image lacks). $OUT gets gpu.txt, serve_bench.log and bench_serve.json.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, fastapi, uvicorn; print('torch', torch.__version__, '| fastapi', fastapi.__version__, '| uvicorn', uvicorn.__version__)" | tee -a "$OUT/gpu.txt"
args=${1:-}
if [[ "$args" != *--ckpt* ]]; then
  tok=${TOKENIZER_DIR:-.gpucache/tok32k}
  if [ ! -d "$tok" ]; then
    tok=/tmp/cache/tokenizer/bpe32k
    [ -f "$tok/tokenizer.json" ] || python3 -m chatlm.tokenize tokenizer=bpe32k hardware=cpu 2>&1 | tail -3 | tee "$OUT/tokenize.log"
  fi
  args="--random-init d20 --tokenizer-dir $tok $args"
fi
# 512-token prompts and 256 new tokens, as the inference bench; 2 requests per client (the round at
# 32 clients is 16K tokens: seconds on a GPU)
# shellcheck disable=SC2086  # the extra arguments are split on spaces on purpose
python3 launch/bench_serve.py --device cuda --prompt-tokens 512 --new-tokens 256 --requests 2 \
  --out "$OUT/bench_serve.json" $args 2>&1 | tee "$OUT/serve_bench.log"
