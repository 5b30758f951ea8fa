"""task=inference: prefill and decode throughput of the engine, time to first token, peak memory.

For each mode (`graphs`: decode steps replayed as CUDA graphs; `eager`: the same steps launched op
by op) and each batch size B: B random prompts of `infer_prompt_tokens` tokens are added to an
idle engine at once and decoded greedily for `infer_new_tokens` tokens (no stop token, so every
row runs to the end). One untimed pass first (graph capture, allocator), then a timed one:

- time to first token: from adding the B requests to the step that returns their first tokens
  (one batched prefill, the first sample and the copy to the host)
- prefill tok/s: B x prompt tokens over that time
- decode tok/s: B x (new tokens - 1) over the wall time of the remaining steps (the aggregate of
  the batch; per sequence divide by B), and the median step time
- peak memory: the most CUDA memory allocated during the timed pass

The card beside it: weight bytes (read once per decode step), KV bytes read per step at mid
generation, and the memory-bandwidth bound B / ((weights + B x KV) / bandwidth). With
`infer_profile`, a few decode steps of each mode at the largest batch run under torch.profiler:
kernel time per step against wall time per step says whether the GPU or the host limits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from chatlm.bench.profile import profile_steps
from chatlm.bench.timing import median, sync
from chatlm.bench.train_bench import device_name
from chatlm.config import BenchConfig
from chatlm.engine.engine import Engine, SamplingParams, cast_for_inference

log = logging.getLogger("chatlm")

# nominal HBM bandwidth by device-name substring, bytes/s (vendor datasheets)
BANDWIDTH = (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12))


def _bandwidth(name: str) -> float | None:
    return next((bw for key, bw in BANDWIDTH if key in name), None)


def _model(cfg: BenchConfig, run: Any) -> tuple[Any, str]:
    """(model in eval mode, where its weights come from): a checkpoint, or the model group at init."""
    device, dtype = run.ctx.device, run.policy.compute_dtype
    if cfg.ckpt:
        from chatlm.runtime.model_loading import load_model

        loaded = load_model(cfg.ckpt, device, dtype)
        return loaded.model, loaded.meta["checkpoint"]
    from chatlm.model import select_inference_backend
    from chatlm.runtime.model_loading import build_model

    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab, device, dtype, select_inference_backend(device, dtype))
    model.init_weights()
    return model.eval(), f"{cfg.model.name} at init (random weights)"


def _weight_bytes(model: Any) -> int:
    """Bytes one decode step reads: every matrix once, plus one row of each embedding table."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, torch.nn.Embedding):
            total += m.weight.size(1) * m.weight.element_size()
    return total


def _kv_read_bytes(engine: Engine, context: int) -> int:
    """Key + value bytes one sequence's decode step reads at `context` cached tokens."""
    cache = engine.cache
    k = cache.k[0]
    per_row = 2 * k.size(1) * k.size(3) * k.element_size()
    return sum(per_row * min(length, context) for length in cache.lengths)


def _one_pass(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    device = engine.device
    params = SamplingParams(max_tokens=new_tokens)
    sync(device)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add(p, params)
    first = engine.step()
    t_first = time.perf_counter()
    steps = []
    last = t_first
    tokens = 0
    while engine.has_work():
        events = engine.step()
        now = time.perf_counter()
        steps.append(now - last)
        last = now
        tokens += sum(1 for e in events if e.token is not None)
    sync(device)
    end = time.perf_counter()
    assert len(first) == len(prompts), "every request should have its first token after the first step"
    return {
        "ttft_s": t_first - t0,
        "decode_s": end - t_first,
        "decode_tokens": tokens,
        "median_step_s": median(steps) if steps else None,
    }


def bench_inference(cfg: BenchConfig, run: Any) -> dict:
    device = run.ctx.device
    model, source = _model(cfg, run)
    cast_for_inference(model)
    new = cfg.infer_new_tokens
    prompt_len = min(cfg.infer_prompt_tokens, model.dims.sequence_len - new)
    if prompt_len < 1:
        from chatlm.errors import ConfigError

        raise ConfigError(
            "infer_new_tokens",
            f"{new} new tokens leave no room for a prompt in the context ({model.dims.sequence_len})",
        )
    modes = [m for m in cfg.infer_modes if m == "eager" or device.type == "cuda"]
    name = device_name(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = model.dims.vocab_size
    results = []
    engines: dict[tuple[str, int], Engine] = {}
    for mode in modes:
        for B in cfg.infer_batch_sizes:
            engine = Engine(
                model,
                max_batch=B,
                max_len=prompt_len + new,
                cuda_graphs=mode in ("graphs", "compiled"),
                compile_decode=mode == "compiled",
            )
            engines[(mode, B)] = engine
            prompts = torch.randint(0, vocab, (B, prompt_len), generator=gen).tolist()
            _one_pass(engine, prompts, new)  # untimed: graph capture, allocator, kernels' first calls
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = _one_pass(engine, prompts, new)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            row = {
                "mode": mode,
                "batch": B,
                "ttft_ms": r["ttft_s"] * 1000,
                "prefill_tok_per_s": B * prompt_len / r["ttft_s"],
                "decode_tok_per_s": r["decode_tokens"] / r["decode_s"],
                "decode_tok_per_s_per_seq": r["decode_tokens"] / r["decode_s"] / B,
                "median_step_ms": None if r["median_step_s"] is None else r["median_step_s"] * 1000,
                "peak_mem_gib": peak,
                "graphs": 0 if engine.graphs is None else len(engine.graphs.graphs),
            }
            results.append(row)
            log.info(
                "%s B=%d: ttft %.1f ms, decode %.0f tok/s (%.2f ms/step)",
                mode,
                B,
                row["ttft_ms"],
                row["decode_tok_per_s"],
                row["median_step_ms"] or 0,
            )
    weights = _weight_bytes(model)
    any_engine = next(iter(engines.values()))
    kv_mid = _kv_read_bytes(any_engine, prompt_len + new // 2)
    bw = _bandwidth(name)
    for row in results:
        row["bandwidth_bound_tok_per_s"] = (
            None if bw is None else row["batch"] / ((weights + row["batch"] * kv_mid) / bw)
        )
        bound = row["bandwidth_bound_tok_per_s"]
        row["fraction_of_bound"] = None if bound is None else row["decode_tok_per_s"] / bound
    profiles = {}
    if cfg.infer_profile and modes:
        B = max(cfg.infer_batch_sizes)
        for mode in modes:
            profiles[mode] = _profile(
                engines[(mode, B)], torch.randint(0, vocab, (B, prompt_len), generator=gen).tolist()
            )
    return {
        "task": "inference",
        "device_name": name,
        "torch": torch.__version__,
        "model": source,
        "depth": model.dims.n_layer,
        "n_embd": model.dims.n_embd,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        "prefill_attention": model.attention_backend,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "weight_bytes": weights,
        "kv_bytes_per_token": any_engine.cache.bytes_per_token(),
        "kv_read_bytes_mid": kv_mid,
        "bandwidth_bytes_per_s": bw,
        "results": results,
        "profile": profiles,
    }


def _profile(engine: Engine, prompts: list[list[int]], steps: int = 8) -> dict[str, Any]:
    """Kernel time per decode step against wall time per step, at steady state."""
    for p in prompts:
        engine.add(p, SamplingParams(max_tokens=steps * 3 + 8))
    for _ in range(4):
        engine.step()
    sync(engine.device)
    t0 = time.perf_counter()
    summary = profile_steps(engine.step, steps, engine.device)
    sync(engine.device)
    summary["wall_ms_per_step_profiled"] = (time.perf_counter() - t0) * 1000 / steps
    for _ in engine.stream():
        pass
    return summary
