"""Tensorwise-scaled FP8 matmuls for the large Linears (nanochat's `--fp8`, spec §1.10).

What happens per call of a converted Linear::

    forward    x (flattened to 2-D) and W are each quantized to float8_e4m3fn with one scale per
               tensor; out = scaled_mm(x8, W8^T) with fast accumulation, in x's dtype
    saved      the two e4m3 tensors and their inverse scales (not the high-precision input)
    backward   grad_out is quantized once to float8_e5m2;
               grad_x = scaled_mm(g8, W8)      (W8 made column-major)
               grad_W = scaled_mm(g8^T, x8)    (g8^T made contiguous, x8 column-major)
               both without fast accumulation

Quantization: scale = fp8_max / max(|t|), computed in float64 and stored as float32, with amax
clamped at 1e-12 (an all-zero tensor gets a huge but finite scale); t8 = clamp(t * scale, +-fp8_max)
cast to the fp8 dtype; the *inverse* scale is what `torch._scaled_mm` takes.

The matmul itself is pluggable (`use_matmul`): the default is `torch._scaled_mm`, which needs a CUDA
GPU with compute capability >= 8.9 (Ada/Hopper/Blackwell). `reference_scaled_mm` dequantizes and
multiplies in fp32, so the autograd function, the layouts and the error of FP8 rounding can be
tested on a CPU. `strict_reference_scaled_mm` additionally asserts `_scaled_mm`'s operand contract
(dtypes, row-/column-major layouts, dims divisible by 16), so CPU tests catch layout mistakes that
only a GPU would otherwise report.

`_scaled_mm` constraints worth knowing: every matrix dim that is a *reduction or output column*
must be divisible by 16, which includes the number of rows M = B*T in the backward (it is the
reduction dim of grad_W). Training shapes satisfy this; evaluate with `fp8_disabled(model)` (as
nanochat does for val bpb, CORE and sampling), which also keeps KV-cache decoding (M = B) in bf16.

Unlike nanochat at 92d63d4, `Float8Linear` subclasses chatlm's `Linear`, so every isinstance check
(FLOP accounting, optimizer routing) sees it; `GPT.num_matmul_params()` / `flops_per_token()` do
not change under conversion.

Convert *before* `torch.compile`; the autograd function is `allow_in_graph`, so compile keeps it as
one opaque node.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from chatlm.model.gpt import Linear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
AMAX_EPS = 1e-12

#: smallest in/out feature count a Linear needs to be converted, and the divisibility required
MIN_FEATURES = 128
FEATURE_MULTIPLE = 16


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


# ----------------------------------------------------------------------------------------------
# pure quantization helpers


def tensorwise_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8_max / max(|t|) as a 0-d float32 tensor; the division happens in float64."""
    amax = t.detach().abs().max().to(torch.float64).clamp(min=AMAX_EPS)
    return (fp8_max(dtype) / amax).to(torch.float32)


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t8, inv_scale): t scaled into the fp8 range, saturated, cast; and 1/scale (0-d float32)."""
    scale = tensorwise_scale(t, dtype)
    limit = fp8_max(dtype)
    t8 = (t.detach().to(torch.float32) * scale).clamp(-limit, limit).to(dtype)
    return t8, scale.reciprocal()


def dequantize(t8: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The high-precision tensor an fp8 tensor and its inverse scale stand for."""
    return (t8.to(torch.float32) * inv_scale.to(torch.float32)).to(dtype)


# ----------------------------------------------------------------------------------------------
# matmul implementations: mm(a8, b8, scale_a, scale_b, out_dtype, use_fast_accum) = (a*sa) @ (b*sb)

MatmulFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype, bool], torch.Tensor]


def torch_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    use_fast_accum: bool,
) -> torch.Tensor:
    """The real kernel (CUDA, SM >= 89). `a` row-major, `b` column-major, scales are inverse scales."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)


def reference_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    use_fast_accum: bool,
) -> torch.Tensor:
    """Dequantize both operands and multiply in fp32 (any device; for tests and debugging)."""
    return (dequantize(a, scale_a) @ dequantize(b, scale_b)).to(out_dtype)


def check_scaled_mm_operands(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> None:
    """Assert the operand contract of tensorwise `torch._scaled_mm` (raises AssertionError)."""
    fp8 = (E4M3, E5M2)
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0], (tuple(a.shape), tuple(b.shape))
    assert a.dtype in fp8 and b.dtype in fp8, (a.dtype, b.dtype)
    assert not (a.dtype == E5M2 and b.dtype == E5M2), "e5m2 x e5m2 is not supported"
    assert a.stride(1) == 1 and a.stride(0) == a.shape[1], f"first operand must be row-major, strides {a.stride()}"
    assert b.stride(0) == 1 and b.stride(1) == b.shape[0], f"second operand must be column-major, strides {b.stride()}"
    assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0, (
        f"dims must be divisible by 16: {tuple(a.shape)} @ {tuple(b.shape)}"
    )
    for s in (scale_a, scale_b):
        assert s.numel() == 1 and s.dtype == torch.float32, (s.shape, s.dtype)


def strict_reference_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    """`reference_scaled_mm` after checking `_scaled_mm`'s layout/dtype contract."""
    check_scaled_mm_operands(a, b, scale_a, scale_b)
    return reference_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum)


_matmul: MatmulFn = torch_scaled_mm


def current_matmul() -> MatmulFn:
    return _matmul


@contextlib.contextmanager
def use_matmul(fn: MatmulFn) -> Iterator[None]:
    """Run converted Linears with another matmul implementation (e.g. `reference_scaled_mm` on CPU).

    A process-wide setting (read at each forward/backward), restored on exit. Not for use inside a
    compiled region: set it before compiling.
    """
    global _matmul
    previous, _matmul = _matmul, fn
    try:
        yield
    finally:
        _matmul = previous


# ----------------------------------------------------------------------------------------------
# autograd function


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major storage (a no-op view when it already is)."""
    return t.t().contiguous().t()


class Fp8Matmul(torch.autograd.Function):
    """y = x @ W^T with tensorwise fp8 operands; saves only fp8 tensors and inverse scales."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        mm = _matmul
        x8, x_inv = quantize(x, E4M3)
        w8, w_inv = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        # w8 is (N, K) row-major, so w8.t() is (K, N) column-major as required
        return mm(x8, w8.t(), x_inv, w_inv, x.dtype, True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        mm = _matmul
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = quantize(grad_out, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # (M, N) @ (N, K): the weight must be the column-major second operand
            grad_x = mm(g8, _column_major(w8), g_inv, w_inv, grad_out.dtype, False)
        if ctx.needs_input_grad[1]:
            # (N, M) @ (M, K): transposed grad made contiguous (row-major), input column-major
            grad_w = mm(g8.t().contiguous(), _column_major(x8), g_inv, x_inv, torch.float32, False)
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_x, grad_w


def allow_in_graph() -> None:
    """Let torch.compile trace through `Fp8Matmul` as one op (idempotent). Done when a model is
    converted, not at import: importing torch._dynamo loads Triton, whose bindings print a
    ~30-line leak report at the exit of every CPU process that imported it."""
    torch._dynamo.allow_in_graph(Fp8Matmul)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) through `Fp8Matmul`, for inputs of any leading shape."""
    x2d = x.reshape(-1, x.shape[-1])
    out = Fp8Matmul.apply(x2d, weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# modules and conversion


class Float8Linear(Linear):
    """A chatlm `Linear` whose matmul runs in fp8. Built from a Linear, sharing its weight Parameter."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, weight)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Float8Linear:
        if lin.bias is not None:
            raise ValueError("Float8Linear has no bias; convert only bias-free Linears")
        new = cls(lin.in_features, lin.out_features, device="meta")
        new.weight = lin.weight  # the same Parameter object: optimizer state and ties stay valid
        new.train(lin.training)
        return new

    def to_linear(self) -> Linear:
        """A plain chatlm Linear sharing this module's weight."""
        lin = Linear(self.in_features, self.out_features, device="meta")
        lin.weight = self.weight
        lin.train(self.training)
        return lin


def is_fp8_eligible(module: nn.Module) -> bool:
    """nanochat's rule: both feature counts divisible by 16 and min(in, out) >= 128; no bias."""
    if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear) or module.bias is not None:
        return False
    i, o = module.in_features, module.out_features
    return i % FEATURE_MULTIPLE == 0 and o % FEATURE_MULTIPLE == 0 and min(i, o) >= MIN_FEATURES


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_to_fp8(model: nn.Module) -> int:
    """Replace every eligible Linear in `model` by a Float8Linear (in place); returns how many.

    In a GPT this converts c_q, c_k, c_v, both c_proj, c_fc and lm_head, and skips the VE gates
    (12 -> n_kv_head) and the smear gate (24 -> 1). Call before torch.compile and before building
    the optimizer is not required (the Parameters are the same objects), but before compile is.
    """
    allow_in_graph()
    targets = [name for name, m in model.named_modules() if name and is_fp8_eligible(m)]
    for name in targets:
        _replace(model, name, Float8Linear.from_linear(model.get_submodule(name)))
    return len(targets)


@contextlib.contextmanager
def fp8_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap every Float8Linear back to a plain Linear (same weights), e.g. for eval.

    The very same Float8Linear objects are put back on exit, also when the body raises. A model
    without Float8Linears passes through unchanged.
    """
    swapped: list[tuple[str, Float8Linear]] = [
        (name, m) for name, m in model.named_modules() if isinstance(m, Float8Linear)
    ]
    for name, m in swapped:
        _replace(model, name, m.to_linear())
    try:
        yield model
    finally:
        for name, m in swapped:
            _replace(model, name, m)


def count_fp8(model: nn.Module) -> int:
    """Number of Float8Linear modules in `model`."""
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def fp8_supported(device: Optional[torch.device] = None) -> bool:
    """True when `torch._scaled_mm` can run here: a CUDA device of compute capability >= 8.9."""
    if not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)
