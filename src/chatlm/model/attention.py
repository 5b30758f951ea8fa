"""Causal sliding-window attention behind one interface, with three kernels.

Tensors are (B, T, heads, D) everywhere (flash-attention's native layout; the model never
transposes). `window` counts the *previous* tokens a query may see, self excluded: a query at
absolute position p sees keys c with c <= p and p - c <= window. A window >= T - 1 is plain causal
attention. Queries are always the *last* Tq positions of the Tk keys (bottom-right alignment), which
makes training (Tq == Tk), prefill and single-token decode the same operation. The KV cache is the
engine's (`chatlm.engine.kv_cache`).

Backends (chosen by `select_backend`, passed around as a plain string, never a module global):

* ``fa4``  flash-attn-4 (CuTe DSL; Hopper/Blackwell, bf16/fp16). Windows are native.
* ``flex`` torch FlexAttention with a sliding-window block mask (compiled on CUDA), so windowed
  layers skip the blocks outside the window instead of computing and masking T^2 scores.
* ``sdpa`` torch scaled_dot_product_attention: `is_causal` fast path when the window covers
  everything, an explicit boolean mask otherwise. The mask path is O(T^2) and is allowed on CPU
  only; on GPU a windowed layer must use fa4 or flex (nanochat's SDPA fallback was 2.7x slower).

Single-token decode (Tq == 1) is handled the same way by every backend: slice the cache to the
last window + 1 keys and run unmasked SDPA, which is exact and needs no mask or kernel compile.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chatlm.config import AttentionBackend, ConfigError

BACKENDS = ("fa4", "flex", "sdpa")


# ----------------------------------------------------------------------------------------------
# availability and selection


@functools.lru_cache(maxsize=1)
def _fa4_func():
    """flash_attn.cute.flash_attn_func, or None when flash-attn-4 is not installed (imported lazily)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # ImportError, or a broken CUDA/CuTe install
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=1)
def _fa4_op():
    """flash-attn-4 as a torch custom op (chatlm::fa4_fwd / fa4_bwd), or None if unavailable.

    flash_attn_func is a Python autograd.Function around CuTe DSL launches, which torch.compile
    cannot trace. As an opaque custom op with a fake (shape) implementation and a registered
    backward, the compiled model's graph stays whole. Measured on an H100 (d12, T=2048, B=16,
    compiled fwd+bwd, SSSL): 58 ms with this op vs 62 ms with flex; calling flash_attn_func
    directly inside the compiled model took 113 ms and twice the memory. Registered on first use,
    once per process, by `prepare_backend` (never inside a compiled trace). Uses
    flash_attn.cute.interface's _flash_attn_fwd/_flash_attn_bwd, the functions flash_attn_func
    itself calls (tested with flash-attn-4 4.0.0b36).
    """
    if _fa4_func() is None:
        return None
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception:
        return None

    def _window(window_left: int):
        # -1 encodes "no window" (full causal), since a custom op's schema needs a plain int.
        return (None, None) if window_left < 0 else (window_left, 0)

    @torch.library.custom_op("chatlm::fa4_fwd", mutates_args=())
    def fa4_fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_left: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = _window(window_left)
        out, lse = _flash_attn_fwd(
            q, k, v, causal=True, window_size_left=left, window_size_right=right, return_lse=True
        )[:2]
        return out, lse

    @fa4_fwd.register_fake
    def _(q, k, v, window_left):
        B, T, H, _ = q.shape
        return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)

    @torch.library.custom_op("chatlm::fa4_bwd", mutates_args=())
    def fa4_bwd(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        window_left: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        left, right = _window(window_left)
        dq, dk, dv = _flash_attn_bwd(
            q, k, v, out, dout, lse, None, True, 0.0, window_size_left=left, window_size_right=right
        )[:3]
        return dq, dk, dv

    @fa4_bwd.register_fake
    def _(dout, q, k, v, out, lse, window_left):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, window_left = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window_left = window_left

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = fa4_bwd(dout.contiguous(), q, k, v, out, lse, ctx.window_left)
        return dq, dk, dv, None

    fa4_fwd.register_autograd(backward, setup_context=setup_context)
    return fa4_fwd


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def backend_unavailable_reason(backend: str, device: Union[str, torch.device], dtype: torch.dtype) -> Optional[str]:
    """Why `backend` cannot run on (device, dtype), or None when it can."""
    device = torch.device(device)
    if backend == "sdpa":
        return None
    if backend == "flex":
        if device.type != "cuda":
            return f"flex attention needs a CUDA device (compiled Triton kernels), got {device.type}"
        if not _flex_available():
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        return None
    if backend == "fa4":
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"flash-attn-4 needs a CUDA device, got {device.type}"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 9:
            return f"flash-attn-4 needs Hopper or newer (SM >= 9.0), got SM {major}.x"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"flash-attn-4 runs bf16/fp16 only, compute dtype is {dtype}"
        if _fa4_func() is None:
            return "flash_attn.cute is not importable (pip install flash-attn-4, the 'gpu' extra)"
        if _fa4_op() is None:
            return "this flash-attn-4 lacks flash_attn.cute.interface._flash_attn_fwd/_bwd (tested: 4.0.0b36)"
        return None
    return f"unknown attention backend {backend!r}; valid: auto, {', '.join(BACKENDS)}"


def select_backend(
    requested: Union[AttentionBackend, str], device: Union[str, torch.device], dtype: torch.dtype
) -> str:
    """Resolve `model.attention_backend` for this device and compute dtype.

    auto: fa4 when installed on a CUDA bf16 run, else flex on CUDA, else sdpa. Naming a backend
    that cannot run raises ConfigError (no silent fallback: a benchmark must run what it says).
    """
    name = requested.value if isinstance(requested, AttentionBackend) else str(requested)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            if dtype == torch.bfloat16 and backend_unavailable_reason("fa4", device, dtype) is None:
                return "fa4"
            if backend_unavailable_reason("flex", device, dtype) is None:
                return "flex"
        return "sdpa"
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ConfigError("model.attention_backend", reason)
    return name


def select_inference_backend(device: Union[str, torch.device], dtype: torch.dtype) -> str:
    """The backend for batches whose shapes change from call to call (evaluation, generation):
    fa4 when it runs, else sdpa. Not flex: it compiles once per new (Tq, Tk, window) and, past
    dynamo's recompile limit, falls back to materializing every score matrix (measured on the
    H200 with CORE's rows: not done in 240 s, docs/performance.md)."""
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and backend_unavailable_reason("fa4", device, dtype) is None:
        return "fa4"
    return "sdpa"


def prepare_backend(backend: str) -> None:
    """Import and register what `backend` needs, eagerly and idempotently.

    Called by GPT when its backend is set and by causal_attention outside compiled code, so that a
    torch.compile trace never runs imports or custom-op registration (a graph break per layer).
    """
    if backend == "fa4":
        _fa4_op()
    elif backend == "flex":
        _flex_available()


# ----------------------------------------------------------------------------------------------
# kernels


def _covers_all(window: int, tk: int) -> bool:
    return window >= tk - 1


def window_mask(tq: int, tk: int, window: int, device: Union[str, torch.device]) -> torch.Tensor:
    """(tq, tk) boolean, True = may attend. Query r sits at absolute position tk - tq + r."""
    pos = torch.arange(tk - tq, tk, device=device)[:, None]
    col = torch.arange(tk, device=device)[None, :]
    return (col <= pos) & (pos - col <= window)


def _sdpa(q, k, v, window: int) -> torch.Tensor:
    tq, tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if tq == tk and _covers_all(window, tk):
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        if q.is_cuda and not _covers_all(window, tk) and torch.is_grad_enabled():
            # training would materialize a dense mask per layer and fall off the flash kernels;
            # inference (evaluation, generation) takes the mask: exact, and no compile per shape
            raise RuntimeError(
                "sdpa would need a dense T x T mask for a sliding-window layer on GPU; "
                "use attention_backend=flex or fa4, or window_pattern=L"
            )
        mask = window_mask(tq, tk, window, q.device)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def _decode(q, k, v, window: int) -> torch.Tensor:
    """Tq == 1: the only query is the newest position; it sees the last window + 1 keys, unmasked."""
    if window + 1 < k.size(1):
        k, v = k[:, -(window + 1) :], v[:, -(window + 1) :]
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=q.size(2) != k.size(2)
    )
    return y.transpose(1, 2)


# CHATLM_DECODE_ATTENTION=cudnn opts in to cuDNN's attention for the decode step (not yet measured
# end to end on a GPU: the default stays the measured matmul path); cleared once cuDNN refuses a shape
_CUDNN_DECODE = {"ok": os.environ.get("CHATLM_DECODE_ATTENTION", "matmul") == "cudnn"}


def single_query_attention(q, keys, values, bias) -> torch.Tensor:
    """One query per sequence against its own cached keys: the engine's decode step.

    q (n, 1, H, D); keys and values (n, Hkv, S, D), head h reading kv head h // (H / Hkv); bias
    (n, 1, 1, S) in the compute dtype on CUDA (float32 on CPU), 0 where a key is visible and -inf
    where not (every row sees at least one). Two batched matmuls around an fp32 softmax (what CPU
    runs too). With CHATLM_DECODE_ATTENTION=cudnn, CUDA with bf16/fp16 and no GQA use cuDNN's
    attention instead (launch/gpu/decode_attention_bench.py: 9.6 us per layer at batch 1 on an H100
    against 13.0 for the matmul path; an opt-in until the whole decode step is measured with it).
    """
    n, _, H, D = q.shape
    Hkv, S = keys.size(1), keys.size(2)
    if q.is_cuda and q.dtype != torch.float32 and H == Hkv and _CUDNN_DECODE["ok"]:
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=bias.to(q.dtype))
            return out.transpose(1, 2)
        except RuntimeError:  # this build or GPU has no cuDNN attention for these shapes
            _CUDNN_DECODE["ok"] = False
    qb = q.reshape(n * Hkv, H // Hkv, D)
    kb, vb = keys.reshape(n * Hkv, S, D), values.reshape(n * Hkv, S, D)
    if q.is_cuda and q.dtype != torch.float32:
        scores = torch.bmm(qb, kb.transpose(1, 2), out_dtype=torch.float32)
    else:
        scores = torch.bmm(qb, kb.transpose(1, 2)).float()
    scores = torch.add(bias.float(), scores.view(n, Hkv, H // Hkv, S), alpha=D**-0.5)
    probs = scores.softmax(dim=-1).to(values.dtype).view(n * Hkv, H // Hkv, S)
    return torch.bmm(probs, vb).view(n, 1, H, D)


def build_block_mask(tq: int, tk: int, window: int, device: str):
    """Sliding-window causal BlockMask for queries at positions [tk - tq, tk)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = tk - tq

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (kv_idx <= pos) & (pos - kv_idx <= window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=device)


# Eager calls reuse masks per shape. A compiled model calls build_block_mask directly: dynamo would
# ignore the cache anyway (tracing the mask's construction into the graph) and warn about it.
flex_block_mask = functools.lru_cache(maxsize=64)(build_block_mask)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """FlexAttention only fuses when compiled; uncompiled it materializes all scores (CPU tests).

    This wrapper serves an *uncompiled* model (evaluation, inference, eager training); inside a
    torch.compile'd model dynamo inlines flex_attention into the model's graph instead. Shapes are
    static: dynamic flex kernels fail to lower in torch 2.11 (NoValidChoicesError). Each new
    (Tq, Tk) compiles once; past dynamo's recompile limit (8) torch runs flex eagerly, which is
    still exact but materializes the scores. fa4 has no such limit.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, window: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    tq, tk = q.size(1), k.size(1)
    compiling = torch.compiler.is_compiling()
    block_mask = (build_block_mask if compiling else flex_block_mask)(tq, tk, window, str(q.device))
    # Inside a compiled model dynamo inlines flex_attention itself; eager CUDA calls need the
    # compiled wrapper to get a fused kernel; CPU (tests) runs the eager reference.
    fn = _compiled_flex() if q.is_cuda and not compiling else flex_attention
    y = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


def _fa4(q, k, v, window: int) -> torch.Tensor:
    # -1 = full causal, i.e. flash_attn_func(..., causal=True, window_size=(None, None)).
    window_left = -1 if _covers_all(window, k.size(1)) else window
    return torch.ops.chatlm.fa4_fwd(q, k, v, window_left)[0]


_KERNELS = {"sdpa": _sdpa, "flex": _flex, "fa4": _fa4}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, backend: str) -> torch.Tensor:
    """Causal attention with a left window. q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D), Tk >= Tq.

    The queries are the last Tq positions. Softmax scale is 1/sqrt(D) (the model pre-scales q and
    k by qk_scale itself). Returns (B, Tq, H, D) in q's dtype.
    """
    if q.size(1) > k.size(1):
        raise ValueError(f"more queries ({q.size(1)}) than keys ({k.size(1)})")
    if q.size(2) % k.size(2):
        raise ValueError(f"{q.size(2)} query heads are not a multiple of {k.size(2)} key/value heads")
    if q.size(1) == 1:
        return _decode(q, k, v, window)
    try:
        kernel = _KERNELS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}") from None
    if not torch.compiler.is_compiling():
        prepare_backend(backend)
    return kernel(q, k, v, window)
