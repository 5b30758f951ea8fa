"""RoPE + QK-norm (+ the value-embedding add) as one custom op over the fused q|k|v matmul output
(`model.rope_kernel`).

nanochat's attention prologue is, per head,

    q = norm(rope(q)) * qk_scale        k = norm(rope(k)) * qk_scale        v = v + gate * ve

Compiled, those few elementwise steps cost more than they should at d20: the backward of RoPE's
half-slices becomes its own pass, the QK-norm backward another, and the three gradients are then
copied into one buffer for the fused projection's input-gradient matmul (docs/performance.md).
`qkv_rope` does the forward in one kernel that reads each token's q|k|v row once, and the backward
in one kernel that writes the gradient of that row directly.

    forward    qkv (B, T, (H + 2 Hkv) D), the output of the one q|k|v matmul -> q, k, v, and
               each head's rstd (fp32)
    saved      q and k (attention keeps them for its backward anyway), the rstds, cos, sin: the
               q|k|v row itself is freed after the forward
    backward   dq, dk, dv -> d qkv; the gradient of v_extra (gate * ve) is dv itself

The kernels normalize before they rotate (fp32 math, one rounding per output). That is nanochat's
function up to the bf16 RoPE tables, whose cos^2 + sin^2 is 1 only within about 2^-8: the two
orders then differ by about 2e-4 relative, below bf16's rounding. The backward is the exact
derivative of what the kernels compute. Off CUDA (or for head sizes that are not a power of two)
the op runs the same formulas in PyTorch (`qkv_rope_forward_torch`, `qkv_rope_backward_torch`);
the tests hold both, and the Triton kernels, against autograd through nanochat's expression
(`qkv_rope_torch`). Used by the
model whenever q|k|v come from one matmul (`model.qkv_matmul`), in bf16 and in fp8.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from chatlm.model.triton_check import triton_available


def kernel_supports(head_dim: int) -> bool:
    """The Triton kernels tile a head's halves with power-of-two ranges."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


def triton_usable(head_dim: int) -> bool:
    """Whether the op runs its Triton kernels for this head size (on CUDA tensors)."""
    return kernel_supports(head_dim) and triton_available()


def rms_eps(dtype: torch.dtype) -> float:
    """The epsilon F.rms_norm uses by default: that of its fp32 accumulation type."""
    return torch.finfo(torch.float32).eps if dtype in (torch.bfloat16, torch.float16) else torch.finfo(dtype).eps


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two channel halves (not interleaved pairs) by -theta, nanochat's convention.

    x: (B, T, heads, D); cos, sin: (1, T, 1, D/2). Kept as nanochat has it (the transpose of the
    textbook rotation; equivalent for training, required for its checkpoints).
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def qkv_rope_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v_extra: Optional[torch.Tensor],
    n_head: int,
    n_kv_head: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nanochat's prologue, from the q|k|v row: the reference for the kernels."""
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    q, k, v = qkv.split([n_head * D, n_kv_head * D, n_kv_head * D], dim=-1)
    q, k, v = q.view(B, T, n_head, D), k.view(B, T, n_kv_head, D), v.view(B, T, n_kv_head, D)
    if v_extra is not None:
        v = v + v_extra
    q = F.rms_norm(apply_rotary(q, cos, sin), (D,)) * scale
    k = F.rms_norm(apply_rotary(k, cos, sin), (D,)) * scale
    return q, k, v.contiguous()


def qkv_rope_forward_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v_extra: Optional[torch.Tensor],
    n_head: int,
    n_kv_head: int,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """The kernel's forward in PyTorch (the op's path off CUDA): per head, rstd of the raw x, then
    normalize, rotate and scale in fp32, one rounding. Returns new tensors (q, k, v, rq, rk)."""
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    eps, c, s = rms_eps(qkv.dtype), cos.float(), sin.float()
    q, k, v = qkv.float().split([n_head * D, n_kv_head * D, n_kv_head * D], dim=-1)

    def heads(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(B, T, n, D)
        rstd = torch.rsqrt(x.pow(2).mean(-1) + eps)
        return apply_rotary(x * (rstd[..., None] * scale), c, s).to(qkv.dtype), rstd

    (q, rq), (k, rk) = heads(q, n_head), heads(k, n_kv_head)
    v = v.reshape(B, T, n_kv_head, D).clone(memory_format=torch.contiguous_format)  # never a view of qkv
    if v_extra is not None:
        v += v_extra.float()
    return q, k, v.to(qkv.dtype), rq, rk


def qkv_rope_backward_torch(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The gradient of the q|k|v row, in fp32 like the kernel, from the outputs q and k and the
    rstds (see qkv_rope_triton for the derivation)."""
    c, s = cos.float(), sin.float()

    def heads(g: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        n = apply_rotary(y.float(), c, -s) / (scale * (c * c + s * s)).repeat(1, 1, 1, 2)
        dn = apply_rotary(g.float() * scale, c, -s)
        return (rstd[..., None] * (dn - n * (dn * n).mean(-1, keepdim=True))).flatten(-2)

    grads = [heads(dq, q, rq), heads(dk, k, rk), dv.float().flatten(-2)]
    return torch.cat(grads, dim=-1).to(q.dtype)


def _use_triton(x: torch.Tensor, head_dim: int) -> bool:
    return x.is_cuda and triton_usable(head_dim)


@torch.library.custom_op("chatlm::qkv_rope", mutates_args=())
def qkv_rope_op(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v_extra: Optional[torch.Tensor],
    n_head: int,
    n_kv_head: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v, rstd of q's heads, rstd of k's heads); see the module doc."""
    if _use_triton(qkv, qkv.size(-1) // (n_head + 2 * n_kv_head)):
        from chatlm.model.qkv_rope_triton import qkv_rope_fwd_triton

        return qkv_rope_fwd_triton(qkv, cos, sin, v_extra, n_head, n_kv_head, scale, rms_eps(qkv.dtype))
    return qkv_rope_forward_torch(qkv, cos, sin, v_extra, n_head, n_kv_head, scale)


@qkv_rope_op.register_fake
def _(qkv, cos, sin, v_extra, n_head, n_kv_head, scale):
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    return (
        qkv.new_empty(B, T, n_head, D),
        qkv.new_empty(B, T, n_kv_head, D),
        qkv.new_empty(B, T, n_kv_head, D),
        qkv.new_empty(B, T, n_head, dtype=torch.float32),
        qkv.new_empty(B, T, n_kv_head, dtype=torch.float32),
    )


@torch.library.custom_op("chatlm::qkv_rope_backward", mutates_args=())
def qkv_rope_backward_op(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if _use_triton(q, q.size(-1)):
        from chatlm.model.qkv_rope_triton import qkv_rope_bwd_triton

        return qkv_rope_bwd_triton(dq, dk, dv, q, k, rq, rk, cos, sin, scale)
    return qkv_rope_backward_torch(dq, dk, dv, q, k, rq, rk, cos, sin, scale)


@qkv_rope_backward_op.register_fake
def _(dq, dk, dv, q, k, rq, rk, cos, sin, scale):
    B, T, H, D = q.shape
    return q.new_empty(B, T, (H + 2 * k.size(2)) * D)


def _setup(ctx, inputs, output):
    _qkv, cos, sin, v_extra, _n_head, _n_kv_head, scale = inputs
    q, k, _v, rq, rk = output
    ctx.mark_non_differentiable(rq, rk)
    ctx.save_for_backward(q, k, rq, rk, cos, sin)  # q and k are attention's inputs: kept anyway
    ctx.scale = scale
    ctx.has_extra = v_extra is not None


def _backward(ctx, dq, dk, dv, _drq, _drk):
    q, k, rq, rk, cos, sin = ctx.saved_tensors
    if torch.is_grad_enabled():
        raise RuntimeError("chatlm::qkv_rope has no double backward; use model.rope_kernel=plain")
    dqkv = qkv_rope_backward_op(dq, dk, dv, q, k, rq, rk, cos, sin, ctx.scale)
    return dqkv, None, None, (dv if ctx.has_extra else None), None, None, None


qkv_rope_op.register_autograd(_backward, setup_context=_setup)


def qkv_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v_extra: Optional[torch.Tensor],
    n_head: int,
    n_kv_head: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, T, H, D), k and v (B, T, Hkv, D) from the q|k|v matmul output (see the module doc)."""
    return qkv_rope_op(qkv, cos, sin, v_extra, n_head, n_kv_head, float(scale))[:3]
