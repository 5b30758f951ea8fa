#!/usr/bin/env bash
# Data-parallel scaling on one multi-GPU node (issues [J] item 5 and [L]): the same training-step
# benchmark on 1, 2, 4, ... GPUs (one rank per GPU, NCCL, sharded optimizer), then the scaling
# efficiency tok/s(N) / (N x tok/s(1)).
#   usage (device tool, carry .whl; add the fa4 PYTHONPATH when flash-attn-4 is installed):
#     bash launch/gpu/scaling.sh "1 2 4 8" model=d24 hardware.device_batch_size=16 precision=fp8
#   The first argument lists the GPU counts; the rest are chatlm.bench overrides for every run.
set -uo pipefail
counts=$1; shift
runs=()
for n in $counts; do
  runs+=("hardware.nproc_per_node=$n total_batch_size=${TOTAL_BATCH:-524288} steps=${STEPS:-12} warmup_steps=${WARMUP:-4} $*")
done
bash "$(dirname "$0")/bench.sh" "${runs[@]}"
OUT=${OUT:-/tmp/out}
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = []
for p in sorted(Path(sys.argv[1]).glob("bench_*.json")):
    b = json.loads(p.read_text())
    world = b.get("world_size") or b.get("config", {}).get("hardware", {}).get("nproc_per_node") or 1
    rows.append((int(world), float(b["tok_per_s"])))
if rows:
    base = dict(rows).get(1)
    for n, tps in rows:
        eff = f"{tps / (n * base):.3f}" if base else "n/a"
        print(f"{n} GPU(s): {tps:,.0f} tok/s, scaling efficiency {eff}")
PY
