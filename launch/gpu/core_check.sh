#!/usr/bin/env bash
# [M] on one GPU, in one call: the training step before and after the core refactor, on synthetic
# tokens and on web-like parquet shards (1,000-document row groups), d12 bf16.
#   usage (device tool; carry .whl .baseline .gpucache):  bash launch/gpu/core_check.sh
#   .baseline holds `git archive 902ac35 src conf` (the code before); .gpucache the bpe32k tokenizer.
# Writes $OUT/bench_{old,new}_{synthetic,web}.json and core_check.log; prints the step-time table.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export CHATLM_CACHE_DIR=$PWD/.gpucache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-24}; WARMUP=${WARMUP:-6}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
PYTHONPATH="$PWD/src:/tmp/site" python3 launch/gpu/web_like_shards.py /tmp/web 24000 | tee -a "$OUT/core_check.log"
run() {  # tree tag extra...
  local tree=$1 tag=$2; shift 2
  local root=/tmp/outputs_$tag
  echo "=== $tag: $*" | tee -a "$OUT/core_check.log"
  CHATLM_OUTPUT_ROOT=$root PYTHONPATH="$tree/src:/tmp/site" python3 -m chatlm.bench model=d12 steps=$STEPS \
    warmup_steps=$WARMUP total_batch_size=524288 "$@" >> "$OUT/core_check.log" 2>&1
  local json; json=$(find "$root/bench" -name bench.json | sort | tail -1)
  [ -n "$json" ] && cp "$json" "$OUT/bench_$tag.json" || echo "=== $tag failed" | tee -a "$OUT/core_check.log"
}
WEB="tokens=data data.sources.0.kind=local data.sources.0.path=/tmp/web/synthetic"
run "$PWD/.baseline" old_synthetic
run "$PWD" new_synthetic
# shellcheck disable=SC2086
run "$PWD/.baseline" old_web $WEB
# shellcheck disable=SC2086
run "$PWD" new_web $WEB
python3 - "$OUT" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<16}{'tok/s':>12}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'cv %':>7}  step times after warm-up (ms)")
for tag in ("old_synthetic", "new_synthetic", "old_web", "new_web"):
    p = out / f"bench_{tag}.json"
    if not p.exists():
        print(f"{tag:<16} missing"); continue
    r = json.loads(p.read_text())
    t = [1000 * x for x in r["step_times_s"][r["warmup_steps"]:]]
    cv = 100 * statistics.pstdev(t) / statistics.mean(t)
    print(f"{tag:<16}{r['tok_per_s']:>12,.0f}{statistics.median(t):>11.1f}{min(t):>9.1f}{max(t):>9.1f}{cv:>7.2f}  "
          + " ".join(f"{x:.0f}" for x in t))
PY
