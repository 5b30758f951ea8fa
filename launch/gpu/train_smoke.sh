#!/usr/bin/env bash
# GPU smoke + throughput run on the lent H100 (no network there): install the few wheels the image
# lacks from .whl/, then train a d12 for a few steps on the embedded corpus and copy the record out.
#   usage (device tool): bash launch/gpu/train_smoke.sh [extra overrides...]
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m chatlm.train model=d12 hardware=h100x1 steps=${STEPS:-30} total_batch_size=524288 \
  eval_tokens=524288 eval_every=-1 sample_every=-1 auto_tokenizer=true "$@" 2>&1 | tee "$OUT/train.log"
run=$(dirname "$(ls -d /tmp/outputs/train/*/*/run.json | tail -1)")
cp "$run/run.json" "$run/metrics.jsonl" "$run/config.resolved.yaml" "$OUT/"
