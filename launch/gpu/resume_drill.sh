#!/usr/bin/env bash
# Resume drill on a multi-GPU node (issue [L]): train, stop with a checkpoint at step STOP, resume
# in the same run directory, finish at STEPS; then compare with the losses of the first part.
#   usage (device tool, carry .whl):
#     STEPS=200 STOP=100 bash launch/gpu/resume_drill.sh model=d24 hardware=h200x8 hardware.device_batch_size=16 precision=fp8
#   PART1 / PART2 add overrides to one part only, e.g. a checkpoint written on 2 ranks resumed on 1 ([J] item 5):
#     PART1=hardware.nproc_per_node=2 PART2=hardware.nproc_per_node=1 STEPS=40 STOP=20 \
#       bash launch/gpu/resume_drill.sh model=d12 eval_every=20 eval_tokens=1048576
#   REFERENCE=1 first trains the same run without a stop (PART1's overrides), and the report compares
#   the two curves before and after the resume step (launch/gpu/drill_compare.py). REFERENCE=only
#   trains just that run, for a separate call when both do not fit in one; compare here with
#     python3 launch/gpu/drill_compare.py --stop 100 --reference REF/reference.metrics.jsonl DRILL/metrics.jsonl
#   Add hardware.deterministic=true to expect a bitwise match. Without it, GPU runs are not bitwise
#   repeatable (two uninterrupted d24 fp8 runs: max |dloss| 0.0019 in steps 1-20, 0.0050 in 21-40),
#   so judge the difference after the resume against the one before it.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RUN=/tmp/runs/drill
args=("steps=${STEPS:-200}" total_batch_size=524288 eval_every=50 eval_tokens=4194304 sample_every=-1
      auto_tokenizer=true "hydra.run.dir=$RUN" "$@")
REF_JSONL=
if [ -n "${REFERENCE:-}" ]; then  # the same run without a stop (PART1's overrides)
  # shellcheck disable=SC2086
  python3 -m chatlm.train "${args[@]}" ${PART1:-} hydra.run.dir=/tmp/runs/reference > "$OUT/reference.log" 2>&1
  echo "reference exit $?"
  cp /tmp/runs/reference/metrics.jsonl "$OUT/reference.metrics.jsonl" && REF_JSONL=$OUT/reference.metrics.jsonl
  if [ "$REFERENCE" = only ]; then exit 0; fi
fi
# shellcheck disable=SC2086  # PART1/PART2 hold several overrides split on spaces
python3 -m chatlm.train "${args[@]}" ${PART1:-} "stop_at_step=${STOP:-100}" > "$OUT/part1.log" 2>&1
echo "part 1 exit $? (a stop at step ${STOP:-100} exits 1 with status preempted)"
# shellcheck disable=SC2086
python3 -m chatlm.train "${args[@]}" ${PART2:-} > "$OUT/part2.log" 2>&1
echo "part 2 exit $?"
cp "$RUN/run.json" "$RUN/metrics.jsonl" "$OUT/"
cp "$RUN/logs/rank0.log" "$OUT/rank0.log" 2>/dev/null || true
python3 "$(dirname "$0")/drill_compare.py" --stop "${STOP:-100}" --run-json "$OUT/run.json" "$OUT/metrics.jsonl" \
  ${REF_JSONL:+--reference "$REF_JSONL" --json "$OUT/drill_compare.json"}
