#!/usr/bin/env bash
# [H] on one GPU: the engine's correctness under CUDA graphs (launch/gpu/engine_check.py), then
# `python -m chatlm.bench task=inference` for a d20-shaped model (random weights, bf16): graphs and
# eager decode at batch 1, 8 and 32, 512-token prompts, 256 new tokens.
#   usage (device tool, carry .whl):  bash launch/gpu/infer_bench.sh ["extra bench overrides"]
#   .whl: hydra-core 1.3.8, omegaconf 2.3.0, antlr4-python3-runtime 4.9.3 (built here with pip wheel),
#   hydra-submitit-launcher 1.2.0, submitit (the image lacks them).
# $OUT gets gpu.txt, engine_check.json, infer.log and bench_inference.json. With a .baseline/src
# tree (e.g. `git archive <rev> src | tar -x -C .baseline`, carried too), the same bench runs on
# that code first, on the same GPU: baseline_infer.log and baseline_bench_inference.json.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
if [ -z "${SKIP_CHECK:-}" ]; then
  python3 launch/gpu/engine_check.py 2>&1 | tee "$OUT/engine_check.log" | tail -1 > "$OUT/engine_check.json"
fi
# shellcheck disable=SC2086  # the extra overrides are split on spaces on purpose
if [ -d .baseline/src ]; then
  PYTHONPATH="$PWD/.baseline/src:/tmp/site" python3 -m chatlm.bench task=inference model=d20 tokenizer=bpe32k \
    hardware=auto ${1:-} 2>&1 | tee "$OUT/baseline_infer.log"
  cp "$(find /tmp/outputs/bench -name bench.json | sort | tail -1)" "$OUT/baseline_bench_inference.json"
fi
# shellcheck disable=SC2086
python3 -m chatlm.bench task=inference model=d20 tokenizer=bpe32k hardware=auto ${1:-} 2>&1 | tee "$OUT/infer.log"
cp "$(find /tmp/outputs/bench -name bench.json | sort | tail -1)" "$OUT/bench_inference.json"
