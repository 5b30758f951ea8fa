#!/usr/bin/env bash
# Resume drill on a multi-GPU node (issue [L]): train, stop with a checkpoint at step STOP, resume
# in the same run directory, finish at STEPS; then compare with the losses of the first part.
#   usage (device tool, carry .whl):
#     STEPS=200 STOP=100 bash launch/gpu/resume_drill.sh model=d24 hardware=h200x8 hardware.device_batch_size=16 precision=fp8
#   PART1 / PART2 add overrides to one part only, e.g. a checkpoint written on 2 ranks resumed on 1 ([J] item 5):
#     PART1=hardware.nproc_per_node=2 PART2=hardware.nproc_per_node=1 STEPS=40 STOP=20 \
#       bash launch/gpu/resume_drill.sh model=d12 eval_every=20 eval_tokens=1048576
#   REFERENCE=1 also trains the same run without a stop (PART1's overrides) and compares the two
#   curves before and after the resume step. GPU runs are not bitwise repeatable (two uninterrupted
#   d24 fp8 runs: max |dloss| 0.0019 in steps 1-20, 0.0050 in 21-40), so judge the difference
#   after the resume against the one before it.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RUN=/tmp/runs/drill
args=("steps=${STEPS:-200}" total_batch_size=524288 eval_every=50 eval_tokens=4194304 sample_every=-1
      auto_tokenizer=true "hydra.run.dir=$RUN" "$@")
# shellcheck disable=SC2086  # PART1/PART2 hold several overrides split on spaces
python3 -m chatlm.train "${args[@]}" ${PART1:-} "stop_at_step=${STOP:-100}" > "$OUT/part1.log" 2>&1
echo "part 1 exit $? (a stop at step ${STOP:-100} exits 1 with status preempted)"
# shellcheck disable=SC2086
python3 -m chatlm.train "${args[@]}" ${PART2:-} > "$OUT/part2.log" 2>&1
echo "part 2 exit $?"
cp "$RUN/run.json" "$RUN/metrics.jsonl" "$OUT/"
cp "$RUN/logs/rank0.log" "$OUT/rank0.log" 2>/dev/null || true
if [ -n "${REFERENCE:-}" ]; then
  # shellcheck disable=SC2086
  python3 -m chatlm.train "${args[@]}" ${PART1:-} hydra.run.dir=/tmp/runs/reference > "$OUT/reference.log" 2>&1
  echo "reference exit $?"
  cp /tmp/runs/reference/metrics.jsonl "$OUT/reference.metrics.jsonl"
fi
python3 - "$OUT/run.json" "$OUT/metrics.jsonl" "${STOP:-100}" "$OUT/reference.metrics.jsonl" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
print("status", r["status"], "| attempts", [(a["status"], a.get("world_size")) for a in r["attempts"]])
print("final", {k: r["final_metrics"].get(k) for k in ("steps", "val_bpb", "train_loss")})
stop = int(sys.argv[3])
rows = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
for row in rows:  # the training losses on either side of the resume, and every evaluation
    step = row.get("step", -1)
    if "val_bpb" in row or abs(step - stop) <= 3:
        print({k: v for k, v in row.items() if k in ("step", "train_loss", "loss", "val_bpb", "tok_per_s")})
if os.path.exists(sys.argv[4]):  # REFERENCE=1: the uninterrupted run
    def curves(path):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        return ({x["step"]: x["loss"] for x in rows if "loss" in x},
                {x["step"]: x["val_bpb"] for x in rows if "val_bpb" in x})
    (loss, bpb), (ref_loss, ref_bpb) = curves(sys.argv[2]), curves(sys.argv[4])
    for name, steps in (("before", [s for s in ref_loss if s <= stop]), ("after", [s for s in ref_loss if s > stop])):
        d = [abs(loss[s] - ref_loss[s]) for s in steps if s in loss]
        print(f"max |loss - reference| {name} the resume: {max(d):.4f} over {len(d)} steps" if d else f"no steps {name}")
    print("val bpb (drill, reference):", {s: (round(bpb[s], 4), round(ref_bpb[s], 4)) for s in sorted(bpb) if s in ref_bpb})
PY
