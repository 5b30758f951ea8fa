#!/usr/bin/env bash
# [R] on one GPU: how fast `python -m chatlm.rl` steps for a d20-shaped model, and where a step's time
# goes: prompts/s and the split between sampling (the engine over the live weights) and training
# (forward/backward of the rollouts + the optimizer step).
#   usage (device tool, carry .whl):  bash launch/gpu/rl_bench.sh ["extra chatlm.rl overrides"]
#   .whl: hydra-core, omegaconf, antlr4-python3-runtime, hydra-submitit-launcher, submitit (as infer_bench.sh).
# A 1-step d20 pretraining run (random-ish weights, bpe32k tokenizer trained on the embedded corpus) is
# the policy: it never stops early, so every completion is rl.max_new_tokens long (the worst case of a
# step). Then, per sampling batch in $SLOTS (rl.device_batch_size, the engine's KV-cache slots), $STEPS
# RL steps of nanochat's shape (16 prompts x 16 samples, 256 new tokens, arithmetic task, no pass@k).
# Steps after the first 2 (compilation, CUDA-graph capture) are summarized by their medians.
# $OUT gets gpu.txt, train.log, rl_<slots>.log, rl_bench.json and rl_bench.md (the table, also printed).
# Env: MODEL (d20), TOKENIZER (bpe32k), HW (auto), SLOTS ("64 256"), STEPS (8), TRAIN_BATCH (65536); e.g. MODEL=tiny
# TOKENIZER=bpe8k HW=cpu TRAIN_BATCH=512 SLOTS=16 STEPS=4 NO_WHL=1 runs the same script on a CPU in minutes.
set -uo pipefail
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD/src:/tmp/site"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
export CHATLM_OUTPUT_ROOT=${CHATLM_OUTPUT_ROOT:-/tmp/outputs} CHATLM_CACHE_DIR=${CHATLM_CACHE_DIR:-/tmp/cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# the device image has no rustbpe: a carried 32K tokenizer (.gpucache/tok32k) stands in for training one
if [ -d .gpucache/tok32k ] && [ ! -d "$CHATLM_CACHE_DIR/tokenizer/bpe32k" ]; then
  mkdir -p "$CHATLM_CACHE_DIR/tokenizer" && cp -r .gpucache/tok32k "$CHATLM_CACHE_DIR/tokenizer/bpe32k"
fi
MODEL=${MODEL:-d20}; TOKENIZER=${TOKENIZER:-bpe32k}; HW=${HW:-auto}; SLOTS=${SLOTS:-"64 256"}; STEPS=${STEPS:-8}
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

# the policy: one pretraining step of the model shape (weights barely trained: completions run to the limit)
BASE="$CHATLM_OUTPUT_ROOT/rl_bench_base"
$PY -m chatlm.train model="$MODEL" tokenizer="$TOKENIZER" hardware="$HW" auto_tokenizer=true steps=1 \
  total_batch_size="${TRAIN_BATCH:-65536}" hardware.compile=false eval_every=-1 eval_tokens=65536 core_metric_every=-1 \
  sample_every=-1 hydra.run.dir="$BASE" \
  > "$OUT/train.log" 2>&1 || { tail -20 "$OUT/train.log"; exit 1; }

for slots in $SLOTS; do
  # shellcheck disable=SC2086  # the extra overrides are split on spaces on purpose
  $PY -m chatlm.rl init_from="$BASE" rl_task=arithmetic hardware="$HW" steps="$STEPS" \
    rl.device_batch_size="$slots" rl.eval_examples=0 eval_every=-1 sample_every=-1 save_every=-1 \
    hydra.run.dir="$CHATLM_OUTPUT_ROOT/rl_bench_$slots" ${1:-} > "$OUT/rl_$slots.log" 2>&1 \
    || { tail -20 "$OUT/rl_$slots.log"; exit 1; }
done

$PY - "$OUT" "$CHATLM_OUTPUT_ROOT" "$MODEL" $SLOTS <<'EOF'
import json, statistics, sys
from pathlib import Path

out, root, model, slots = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
gpu = (out / "gpu.txt").read_text().strip().splitlines()
results = []
for s in slots:
    run = root / f"rl_bench_{s}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "reward" in r and "sampling_s" in r]
    timed = [r for r in rl if r["step"] > 2] or rl
    step_ms = {r["step"]: r["dt_ms"] for r in rows if "dt_ms" in r}
    med = lambda key: statistics.median(r[key] for r in timed)
    dt = statistics.median(step_ms[r["step"]] for r in timed) / 1000
    plan = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())["plan"]
    results.append({
        "slots": int(s),
        "steps_timed": [r["step"] for r in timed],
        "step_s": dt,
        "prompts_per_s": plan["examples_per_rank"] * plan["world_size"] / dt,
        "sampling_s": med("sampling_s"),
        "train_s": med("train_s"),
        "sampling_frac": med("sampling_s") / dt,
        "sampling_tok_per_s": med("sampling_tok_per_s"),
        "train_tok_per_s": med("train_tok_per_s"),
        "completion_len": med("completion_len"),
        "plan": plan,
    })
head = "| slots | step s | prompts/s | sampling s | training s | sampling share | sampling tok/s | training tok/s | completion len |"
lines = [f"model {model}, {gpu[0]}, {gpu[-1]}", "", head, "|" + "---|" * 9]
for r in results:
    lines.append(
        f"| {r['slots']} | {r['step_s']:.2f} | {r['prompts_per_s']:.2f} | {r['sampling_s']:.2f} | {r['train_s']:.2f} "
        f"| {100 * r['sampling_frac']:.0f}% | {r['sampling_tok_per_s']:,.0f} | {r['train_tok_per_s']:,.0f} "
        f"| {r['completion_len']:.0f} |"
    )
(out / "rl_bench.md").write_text("\n".join(lines) + "\n")
(out / "rl_bench.json").write_text(json.dumps({"model": model, "gpu": gpu, "results": results}, indent=2) + "\n")
print("\n".join(lines))
EOF
