#!/usr/bin/env bash
# One device call for the numbers the post-pretraining stages still owe (issues [H], [G], [S], [R]),
# in priority order, each part capped so the call fits its 600 s:
#   1. [H] engine decode at batch 1/8/32 (graphs, eager, compiled), and graphs with cuDNN decode attention
#   2. [G] SFT tok/s beside pretraining tok/s (launch/gpu/sft_bench.sh)
#   3. [S] served tok/s at 1/8/32 streaming clients vs the engine (launch/gpu/serve_bench.sh)
#   4. [R] RL step split between sampling and training (launch/gpu/rl_bench.sh), with what time is left
# usage (device tool): bash launch/gpu/stages_bench.sh   with carry [".whl", ".gpucache"]: .gpucache/tok32k is
# a 32K tokenizer trained here (python -m chatlm.tokenize tokenizer=bpe32k; the device image has no rustbpe),
# .whl infer_bench.sh's wheels plus
# the serve extra's: fastapi, starlette, pydantic, pydantic_core, anyio, sniffio, h11, click, uvicorn,
# annotated-types, typing-inspection, annotated-doc, idna, downloaded for Python 3.12 as the README says).
# $OUT gets gpu.txt, infer.json, infer_cudnn.json, sft_bench.json, bench_train.json, bench_serve.json, rl_bench.json.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 CHATLM_OUTPUT_ROOT=/tmp/outputs CHATLM_CACHE_DIR=/tmp/cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
latest() { find /tmp/outputs/bench -name bench.json | sort | tail -1; }
B="python3 -m chatlm.bench task=inference model=d20 tokenizer=bpe32k hardware=auto infer_profile=false"
CHATLM_DECODE_ATTENTION=cudnn timeout 60 $B infer_modes=[graphs] > /tmp/infer_cudnn.log 2>&1 && cp "$(latest)" "$OUT/infer_cudnn.json"
timeout 220 $B infer_modes=[graphs,eager,compiled] > /tmp/infer.log 2>&1 && cp "$(latest)" "$OUT/infer.json"
grep -h "B=" /tmp/infer_cudnn.log /tmp/infer.log
OUT=/tmp/o_sft STEPS=10 timeout 190 bash launch/gpu/sft_bench.sh > /tmp/sft.log 2>&1
tail -5 /tmp/sft.log; cp /tmp/o_sft/sft_bench.json /tmp/o_sft/bench_train.json "$OUT/" 2>/dev/null
OUT=/tmp/o_serve timeout 100 bash launch/gpu/serve_bench.sh > /tmp/serve.log 2>&1
tail -9 /tmp/serve.log; cp /tmp/o_serve/bench_serve.json "$OUT/" 2>/dev/null
OUT=/tmp/o_rl SLOTS=64 STEPS=4 timeout 120 bash launch/gpu/rl_bench.sh > /tmp/rl.log 2>&1
tail -6 /tmp/rl.log; cp /tmp/o_rl/rl_bench.json "$OUT/" 2>/dev/null
exit 0
