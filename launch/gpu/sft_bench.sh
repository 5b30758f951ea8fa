#!/usr/bin/env bash
# [G] on one GPU: SFT tokens/s of a d20-shaped model beside pretraining tokens/s (the same model,
# sequence length and batch), and the padding waste of the SFT rows.
#   usage (device tool, carry .whl; optionally .sftdata = a `chatlm fetch sft` directory):
#     bash launch/gpu/sft_bench.sh
#   .whl: as infer_bench.sh. Env: MODEL (d20), STEPS (30), HW (auto), SFT_BATCH (524288 tokens per step).
# Pretraining: `chatlm.bench model=d20` (Trainer.step on synthetic tokens, compiled). SFT: a 1-step
# d20 pretraining run is the base (the same directory and overrides as rl_bench.sh, which then reuses
# it), then `chatlm.sft` for $STEPS steps on mixture=generated (and mixture=offline when .sftdata is
# carried); its tok/s is the median of metrics.jsonl after the first 5 steps (compilation).
# $OUT gets gpu.txt, tokenize.log, bench_train.json, sft_<mixture>.log, sft_bench.json.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
export CHATLM_OUTPUT_ROOT=${CHATLM_OUTPUT_ROOT:-/tmp/outputs} CHATLM_CACHE_DIR=${CHATLM_CACHE_DIR:-/tmp/cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# the device image has no rustbpe: a carried 32K tokenizer (.gpucache/tok32k) stands in for training one
if [ -d .gpucache/tok32k ] && [ ! -d "$CHATLM_CACHE_DIR/tokenizer/bpe32k" ]; then
  mkdir -p "$CHATLM_CACHE_DIR/tokenizer" && cp -r .gpucache/tok32k "$CHATLM_CACHE_DIR/tokenizer/bpe32k"
fi
MODEL=${MODEL:-d20}; STEPS=${STEPS:-30}; HW=${HW:-auto}; SFT_BATCH=${SFT_BATCH:-524288}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -d .sftdata ]; then mkdir -p "$CHATLM_CACHE_DIR" && cp -r .sftdata "$CHATLM_CACHE_DIR/sft"; fi

BASE="$CHATLM_OUTPUT_ROOT/rl_bench_base"
python3 -m chatlm.train model="$MODEL" tokenizer=bpe32k hardware="$HW" auto_tokenizer=true steps=1 \
  total_batch_size=65536 hardware.compile=false eval_every=-1 eval_tokens=65536 core_metric_every=-1 \
  sample_every=-1 hydra.run.dir="$BASE" > "$OUT/tokenize.log" 2>&1 || { tail -20 "$OUT/tokenize.log"; exit 1; }

python3 -m chatlm.bench model="$MODEL" tokenizer=bpe32k hardware="$HW" steps=16 warmup_steps=6 \
  > "$OUT/bench_train.log" 2>&1 || tail -20 "$OUT/bench_train.log"
cp "$(find "$CHATLM_OUTPUT_ROOT/bench" -name bench.json | sort | tail -1)" "$OUT/bench_train.json"

mixtures="generated"
[ -d "$CHATLM_CACHE_DIR/sft" ] && mixtures="generated offline"
for mix in $mixtures; do
  python3 -m chatlm.sft init_from="$BASE" mixture="$mix" hardware="$HW" steps="$STEPS" total_batch_size="$SFT_BATCH" \
    eval_every=-1 sample_every=-1 hydra.run.dir="$CHATLM_OUTPUT_ROOT/sft_$mix" > "$OUT/sft_$mix.log" 2>&1 \
    || tail -20 "$OUT/sft_$mix.log"
done

python3 - "$OUT" "$CHATLM_OUTPUT_ROOT" $mixtures <<'PY'
import json, statistics, sys
from pathlib import Path

out, root, mixtures = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
train = json.loads((out / "bench_train.json").read_text())
rows = [{"what": "pretraining (chatlm.bench)", "tok_per_s": train.get("tok_per_s"), "padding": 0.0}]
for mix in mixtures:
    run = root / f"sft_{mix}"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tok = [m["tok_per_s"] for m in metrics if "tok_per_s" in m and m.get("step", 0) > 5]
    derived = (run / "config.resolved.yaml").read_text()
    pad = next((float(x.split(":")[1]) for x in derived.splitlines() if x.strip().startswith("padding_fraction:")), None)
    med = statistics.median(tok) if tok else None
    rows.append({"what": f"sft mixture={mix}", "tok_per_s": med, "padding": pad,
                 "useful_tok_per_s": None if med is None or pad is None else med * (1 - pad)})
(out / "sft_bench.json").write_text(json.dumps({"gpu": (out / "gpu.txt").read_text().strip(), "rows": rows}, indent=2))
print("| run | tok/s (all slots) | padding | tok/s without padding |")
print("|---|---:|---:|---:|")
for r in rows:
    tok = f"{r['tok_per_s']:,.0f}" if r.get("tok_per_s") else "?"
    useful = f"{r['useful_tok_per_s']:,.0f}" if r.get("useful_tok_per_s") else tok
    print(f"| {r['what']} | {tok} | {100 * (r['padding'] or 0):.1f}% | {useful} |")
PY
