#!/usr/bin/env bash
# GPU correctness runs (issue [J] item 4): the same short d12 training with each attention backend,
# and fp8 against bf16; metrics.jsonl of every run goes to $OUT, then launch/gpu/compare_curves.py
# prints the largest loss differences.
#   usage (device tool): bash launch/gpu/correctness.sh VARIANT...    VARIANT = name:override,override,...
#   e.g. bash launch/gpu/correctness.sh flex_L:model.window_pattern=L,model.attention_backend=flex \
#                                       sdpa_L:model.window_pattern=L,model.attention_backend=sdpa
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STEPS=${STEPS:-200}
common=(model=d12 hardware=h100x1 total_batch_size=65536 "steps=$STEPS" eval_every=50 eval_tokens=1048576
        sample_every=-1 auto_tokenizer=true)
for variant in "$@"; do
  name=${variant%%:*}
  IFS=, read -r -a overrides <<< "${variant#*:}"
  start=$(date +%s)
  TORCH_LOGS=recompiles python3 -m chatlm.train "${common[@]}" "${overrides[@]}" "hydra.run.dir=/tmp/runs/$name" \
    > "$OUT/$name.log" 2>&1 || echo "$name failed (see $name.log)"
  echo "$name: $(( $(date +%s) - start )) s, recompiles: $(grep -c 'Recompiling' "$OUT/$name.log" || true)"
  cp /tmp/runs/$name/metrics.jsonl "$OUT/$name.metrics.jsonl" 2>/dev/null || true
  cp /tmp/runs/$name/run.json "$OUT/$name.run.json" 2>/dev/null || true
done
python3 launch/gpu/compare_curves.py "$OUT" | tee "$OUT/compare.txt"
