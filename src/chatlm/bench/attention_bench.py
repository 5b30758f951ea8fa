"""task=attention: fwd+bwd of each attention backend at the model's shapes, against an fp32 reference.

For every backend this machine can run (chatlm.model.attention.backend_unavailable_reason decides,
the same test training uses) and every distinct window of the model's pattern, the kernel that
training calls (`causal_attention`) is timed forward alone and forward+backward, on inputs shaped
like the model's (B, T, H, D; q and k RMS-normalized and scaled by qk_scale as the model does).

FLOP counts, both per call:
- `model_flops`: what chatlm.runtime.flops charges a training step (12*H*D*min(w, T) per token: no
  causal halving), so these TFLOP/s add up to the MFU accounting;
- `effective_flops`: flash-attention's convention, 4*H*D per attended (query, key) pair forward and
  2.5x that backward (14*H*D per pair for fwd+bwd), counting only the pairs the mask lets through.

The error check compares `attn_check_rows` batch rows of the output and of dq, dk, dv with an
explicit fp32 softmax attention computed from the same (upcast) inputs.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Optional

import torch

from chatlm.bench.timing import median, sync, time_calls
from chatlm.bench.train_bench import device_name, kernel_bench_shapes
from chatlm.config import BenchConfig
from chatlm.model.attention import BACKENDS, backend_unavailable_reason, causal_attention, window_mask

log = logging.getLogger("chatlm")


def attended_pairs(T: int, window: int) -> int:
    """(query, key) pairs a causal left window lets through: sum over q of min(q, window) + 1."""
    w = min(window, T - 1)
    # queries 0..w see q+1 keys; queries w+1..T-1 see w+1 keys
    return (w + 1) * (w + 2) // 2 + (T - w - 1) * (w + 1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Plain softmax attention in the inputs' dtype (callers pass fp32). (B, T, H, D) in and out."""
    H, Hkv = q.size(2), k.size(2)
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = qt @ kt.transpose(-1, -2) / math.sqrt(q.size(-1))
    mask = window_mask(q.size(1), k.size(1), window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ vt).transpose(1, 2)


def _errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (got.detach().float() - ref.detach()).abs()
    return {"max_abs": float(diff.max()), "rel": float(diff.norm() / ref.norm().clamp_min(1e-30))}


def make_inputs(
    B: int, T: int, H: int, Hkv: int, D: int, qk_scale: float, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen)

    def normed(t: torch.Tensor) -> torch.Tensor:  # the model's QK-norm and extra scale
        return torch.nn.functional.rms_norm(t, (t.size(-1),)) * qk_scale

    q = normed(randn(B, T, H, D)).to(dtype)
    k = normed(randn(B, T, Hkv, D)).to(dtype)
    v = randn(B, T, Hkv, D).to(dtype)
    dout = randn(B, T, H, D).to(dtype)
    return q, k, v, dout


def bench_one(backend: str, window: int, q, k, v, dout, cfg: BenchConfig, device: torch.device) -> dict:
    """Timings and errors of one (backend, window)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return causal_attention(q, k, v, window=window, backend=backend)

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        out = causal_attention(q, k, v, window=window, backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    entry: dict[str, Any] = {"backend": backend, "window": window}
    try:
        fwd_times = time_calls(fwd, cfg.attn_iters, cfg.attn_warmup, device)
        times = time_calls(fwd_bwd, cfg.attn_iters, cfg.attn_warmup, device)
    except Exception as e:  # e.g. sdpa refusing a dense window mask on GPU: record, go on
        sync(device)
        entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return entry
    entry.update(fwd_s=median(fwd_times), fwd_bwd_s=median(times), fwd_bwd_times_s=times)
    rows = min(cfg.attn_check_rows, q.size(0))
    if rows:
        out, dq, dk, dv = fwd_bwd()
        q32, k32, v32 = (t[:rows].detach().float().requires_grad_(True) for t in (q, k, v))
        ref = reference_attention(q32, k32, v32, window)
        rdq, rdk, rdv = torch.autograd.grad(ref, (q32, k32, v32), dout[:rows].float())
        entry["errors"] = {
            "out": _errors(out[:rows], ref.detach()),
            "dq": _errors(dq[:rows], rdq),
            "dk": _errors(dk[:rows], rdk),
            "dv": _errors(dv[:rows], rdv),
        }
        entry["max_abs_err"] = max(e["max_abs"] for e in entry["errors"].values())
        del out, dq, dk, dv, ref, rdq, rdk, rdv, q32, k32, v32
    return entry


def bench_attention(cfg: BenchConfig, run: Any) -> dict:
    device, dtype, dims, B = kernel_bench_shapes(cfg, run, cfg.attn_batch_size)
    T, H, Hkv, D = dims.sequence_len, dims.n_head, dims.n_kv_head, dims.head_dim
    layers_per_window = Counter(min(w, T) for w in dims.windows)
    windows = sorted(layers_per_window)

    requested = list(cfg.attn_backends) or list(BACKENDS)
    available, skipped = [], {}
    for backend in requested:
        reason = backend_unavailable_reason(backend, device, dtype)
        if reason is None:
            available.append(backend)
        else:
            skipped[backend] = reason
    log.info(
        "attention bench d%d: B=%d T=%d H=%d Hkv=%d D=%d windows %s (%s) | %s | backends %s%s",
        dims.n_layer,
        B,
        T,
        H,
        Hkv,
        D,
        windows,
        dims.window_chars(),
        str(dtype).removeprefix("torch."),
        available,
        f" (skipped: {skipped})" if skipped else "",
    )

    q, k, v, dout = make_inputs(B, T, H, Hkv, D, cfg.model.qk_scale, dtype, device, cfg.seed)
    results = []
    for backend in available:
        for window in windows:
            entry = bench_one(backend, window, q, k, v, dout, cfg, device)
            pairs = attended_pairs(T, window)
            entry.update(
                layers=layers_per_window[window],
                attended_pairs=pairs,
                model_flops=12 * H * D * min(window, T) * B * T,
                effective_flops=14 * B * H * D * pairs,
            )
            if "fwd_bwd_s" in entry:
                entry["model_tflops"] = entry["model_flops"] / entry["fwd_bwd_s"] / 1e12
                entry["effective_tflops"] = entry["effective_flops"] / entry["fwd_bwd_s"] / 1e12
                log.info(
                    "%s w=%d: fwd %.3f ms, fwd+bwd %.3f ms (%.0f effective TFLOP/s), max |err| %s",
                    backend,
                    window,
                    1000 * entry["fwd_s"],
                    1000 * entry["fwd_bwd_s"],
                    entry["effective_tflops"],
                    f"{entry['max_abs_err']:.2e}" if "max_abs_err" in entry else "n/a",
                )
            else:
                log.info("%s w=%d: %s", backend, window, entry["error"])
            results.append(entry)

    # per backend: the attention time of one micro-batch through every layer of the pattern
    per_model: dict[str, Optional[float]] = {}
    for backend in available:
        rows = [r for r in results if r["backend"] == backend]
        ok = all("fwd_bwd_s" in r for r in rows)
        per_model[backend] = sum(r["fwd_bwd_s"] * r["layers"] for r in rows) if ok else None
    return {
        "task": "attention",
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "model": cfg.model.name,
        "depth": dims.n_layer,
        "windows": dims.window_chars(),
        "dtype": run.policy.dtype_name,
        "batch": B,
        "seq_len": T,
        "n_head": H,
        "n_kv_head": Hkv,
        "head_dim": D,
        "iters": cfg.attn_iters,
        "warmup": cfg.attn_warmup,
        "check_rows": min(cfg.attn_check_rows, B),
        "backends": available,
        "skipped": skipped,
        "results": results,
        "model_attention_fwd_bwd_s": per_model,
    }
