#!/usr/bin/env bash
# Throughput/MFU benchmarks on the lent GPU (no network there): install the few wheels the image
# lacks from .whl/ (see train_smoke.sh), then run `python -m chatlm.bench` once per argument, each
# argument being one configuration's overrides, and copy every bench.json to $OUT.
#   usage (device tool, carry .whl):
#     bash launch/gpu/bench.sh "model=d12 total_batch_size=524288" "model=d20 precision=fp8"
#   The default hardware group is `auto` (first GPU, bf16, compiled, device batch 32, nominal peak
#   from the GPU's name). Each configuration is a fresh process, so each compiles again (the inductor
#   cache under /tmp speeds up repeats while the machine stays warm).
#   $OUT gets gpu.txt, bench.log and bench_NN.json (NN = the argument's position; profile_NN.txt and kernels_NN.tsv
#   with profile_steps > 0), then a summary table is printed last. The tool returns at most 8 files.
set -uo pipefail
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then  # SKIP_WHEELS=1: use this environment as is
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CHATLM_OUTPUT_ROOT=${CHATLM_OUTPUT_ROOT:-/tmp/outputs} CHATLM_CACHE_DIR=${CHATLM_CACHE_DIR:-/tmp/cache}
# nanochat's allocator setting: fewer fragmentation OOMs at the largest device batches
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
fi
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
i=0
failed=0
for overrides in "$@"; do
  i=$((i + 1))
  tag=$(printf %02d "$i")
  marker=$(mktemp)
  echo "=== [$tag] python -m chatlm.bench $overrides" | tee -a "$OUT/bench.log"
  start=$(date +%s)
  # shellcheck disable=SC2086  # one argument = several overrides, split on spaces on purpose
  $PY -m chatlm.bench $overrides 2>&1 | tee -a "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  echo "=== [$tag] exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"
  json=$(find "$CHATLM_OUTPUT_ROOT/bench" -name bench.json -newer "$marker" 2>/dev/null | sort | tail -1)
  rm -f "$marker"
  if [ "$rc" = 0 ] && [ -n "$json" ]; then
    cp "$json" "$OUT/bench_$tag.json"
    if [ -f "$(dirname "$json")/profile.txt" ]; then cp "$(dirname "$json")/profile.txt" "$OUT/profile_$tag.txt"; fi
    if [ -f "$(dirname "$json")/kernels.tsv" ]; then cp "$(dirname "$json")/kernels.tsv" "$OUT/kernels_$tag.tsv"; fi
  else
    failed=$((failed + 1))
  fi
done
$PY launch/gpu/bench_summary.py "$OUT"/bench_*.json
exit $(( failed > 0 ))
