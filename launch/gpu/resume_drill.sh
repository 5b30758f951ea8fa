#!/usr/bin/env bash
# Resume drill on a multi-GPU node (issue [L]): train, stop with a checkpoint at step STOP, resume
# in the same run directory, finish at STEPS; then compare with the losses of the first part.
#   usage (device tool, carry .whl):
#     STEPS=200 STOP=100 bash launch/gpu/resume_drill.sh model=d24 hardware=h200x8 hardware.device_batch_size=16 precision=fp8
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RUN=/tmp/runs/drill
args=("steps=${STEPS:-200}" total_batch_size=524288 eval_every=50 eval_tokens=4194304 sample_every=-1
      auto_tokenizer=true "hydra.run.dir=$RUN" "$@")
python3 -m chatlm.train "${args[@]}" "stop_at_step=${STOP:-100}" > "$OUT/part1.log" 2>&1
echo "part 1 exit $? (a stop at step ${STOP:-100} exits 1 with status preempted)"
python3 -m chatlm.train "${args[@]}" > "$OUT/part2.log" 2>&1
echo "part 2 exit $?"
cp "$RUN/run.json" "$RUN/metrics.jsonl" "$OUT/"
python3 - "$OUT/run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("status", r["status"], "| attempts", [(a["status"], a.get("world_size")) for a in r["attempts"]])
print("final", {k: r["final_metrics"].get(k) for k in ("steps", "val_bpb", "train_loss")})
PY
