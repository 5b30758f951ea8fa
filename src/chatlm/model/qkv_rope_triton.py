"""The Triton kernels behind `chatlm.model.qkv_rope`: QK-norm + RoPE (+ the value-embedding add)
over the fused q|k|v matmul output, forward and backward, one launch each.

One program per token. The forward reads the token's q|k|v row once and writes q and k (RMS-normed
per head, rotated, times `scale`), each head's rstd (fp32), and v (plus `v_extra` when given). The
backward reads the gradients of q, k and v, the outputs q and k (which attention keeps for its own
backward anyway) and the rstds, and writes the gradient of the whole q|k|v row, which is what the
one input-gradient matmul of the fused projection consumes. The q|k|v row itself is not kept.
Everything is computed in fp32 and rounded once on the way out.

RMS-norm then rotation equals nanochat's rotation then RMS-norm, since a rotation of the
(j, j + D/2) pairs keeps each head's mean square; with bf16 tables it is a rotation only to about
2^-8, so the two orders differ by about 2e-4 relative (below bf16 rounding). With n = x * rstd,
y1 = s (n1 cos + n2 sin) and
y2 = s (n2 cos - n1 sin) for the scale s, the backward recovers n = R^-1(y) / s, where
R^-1 = R^T / (cos^2 + sin^2) (the tables are bf16, so R is a rotation only to bf16 precision),
takes dn = s R^T(g), and returns dx = rstd * (dn - n * mean(dn * n)).

Importing this module needs `triton`. Set TRITON_INTERPRET=1 before importing it to run the
kernels on CPU tensors (slowly), which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@triton.jit
def _heads_fwd(src, dst, rstd_out, c, s, scale, eps, NH: tl.constexpr, NHP: tl.constexpr, D: tl.constexpr):
    # src, dst: the first element of NH contiguous heads of D channels; rstd_out: NH floats
    HALF: tl.constexpr = D // 2
    hh = tl.arange(0, NHP)
    h = hh[:, None]
    off = h * D + tl.arange(0, HALF)[None, :]
    m = h < NH
    x1 = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + HALF, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    tl.store(rstd_out + hh, rstd, mask=hh < NH)
    r = (rstd * scale)[:, None]
    n1 = x1 * r
    n2 = x2 * r
    tl.store(dst + off, (n1 * c + n2 * s).to(dst.dtype.element_ty), mask=m)
    tl.store(dst + off + HALF, (n2 * c - n1 * s).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _heads_bwd(g, g_hs, y, rstd_in, dst, c, s, scale, NH: tl.constexpr, NHP: tl.constexpr, D: tl.constexpr):
    # g: the gradient's heads, g_hs elements apart; y (the forward's output), dst: contiguous heads
    HALF: tl.constexpr = D // 2
    hh = tl.arange(0, NHP)
    h = hh[:, None]
    j = tl.arange(0, HALF)[None, :]
    off = h * D + j
    m = h < NH
    g1 = tl.load(g + h * g_hs + j, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(g + h * g_hs + j + HALF, mask=m, other=0.0).to(tl.float32)
    y1 = tl.load(y + off, mask=m, other=0.0).to(tl.float32)
    y2 = tl.load(y + off + HALF, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_in + hh, mask=hh < NH, other=0.0)[:, None]
    inv = 1.0 / (scale * (c * c + s * s))
    n1 = (y1 * c - y2 * s) * inv
    n2 = (y1 * s + y2 * c) * inv
    dn1 = (g1 * c - g2 * s) * scale
    dn2 = (g1 * s + g2 * c) * scale
    dot = ((tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / D)[:, None]
    tl.store(dst + off, (rstd * (dn1 - n1 * dot)).to(dst.dtype.element_ty), mask=m)
    tl.store(dst + off + HALF, (rstd * (dn2 - n2 * dot)).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _token(COS, SIN, T, s_cs, D: tl.constexpr):
    # this program's token: its row, batch index, position, and the position's cos/sin (1, D/2)
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    j = tl.arange(0, D // 2)[None, :]
    c = tl.load(COS + t * s_cs + j).to(tl.float32)
    s = tl.load(SIN + t * s_cs + j).to(tl.float32)
    return row, row // T, t, c, s


@triton.jit
def _qkv_rope_fwd_kernel(
    QKV,
    COS,
    SIN,
    VX,
    Q,
    K,
    V,
    RQ,
    RK,
    T,
    s_b,
    s_t,
    s_cs,
    s_vx_b,
    s_vx_t,
    scale,
    eps,
    H: tl.constexpr,
    HKV: tl.constexpr,
    HP: tl.constexpr,
    HKVP: tl.constexpr,
    D: tl.constexpr,
    HAS_VX: tl.constexpr,
):
    row, b, t, c, s = _token(COS, SIN, T, s_cs, D)
    src = QKV + b * s_b + t * s_t
    _heads_fwd(src, Q + row * (H * D), RQ + row * H, c, s, scale, eps, H, HP, D)
    _heads_fwd(src + H * D, K + row * (HKV * D), RK + row * HKV, c, s, scale, eps, HKV, HKVP, D)
    h = tl.arange(0, HKVP)[:, None]
    off = h * D + tl.arange(0, D)[None, :]
    m = h < HKV
    v = tl.load(src + (H + HKV) * D + off, mask=m, other=0.0).to(tl.float32)
    if HAS_VX:
        v += tl.load(VX + b * s_vx_b + t * s_vx_t + off, mask=m, other=0.0).to(tl.float32)
    tl.store(V + row * (HKV * D) + off, v.to(V.dtype.element_ty), mask=m)


@triton.jit
def _qkv_rope_bwd_kernel(
    DQ,
    DK,
    DV,
    Q,
    K,
    RQ,
    RK,
    COS,
    SIN,
    DQKV,
    T,
    s_cs,
    s_dq_b,
    s_dq_t,
    s_dq_h,
    s_dk_b,
    s_dk_t,
    s_dk_h,
    s_dv_b,
    s_dv_t,
    s_dv_h,
    scale,
    H: tl.constexpr,
    HKV: tl.constexpr,
    HP: tl.constexpr,
    HKVP: tl.constexpr,
    D: tl.constexpr,
):
    row, b, t, c, s = _token(COS, SIN, T, s_cs, D)
    out = DQKV + row * ((H + 2 * HKV) * D)
    _heads_bwd(DQ + b * s_dq_b + t * s_dq_t, s_dq_h, Q + row * (H * D), RQ + row * H, out, c, s, scale, H, HP, D)
    _heads_bwd(
        DK + b * s_dk_b + t * s_dk_t,
        s_dk_h,
        K + row * (HKV * D),
        RK + row * HKV,
        out + H * D,
        c,
        s,
        scale,
        HKV,
        HKVP,
        D,
    )
    h = tl.arange(0, HKVP)[:, None]
    e = tl.arange(0, D)[None, :]
    m = h < HKV
    dv = tl.load(DV + b * s_dv_b + t * s_dv_t + h * s_dv_h + e, mask=m, other=0.0)
    tl.store(out + (H + HKV) * D + h * D + e, dv.to(DQKV.dtype.element_ty), mask=m)


def _check_rows(*tensors: torch.Tensor) -> None:
    for x in tensors:
        if x.stride(-1) != 1:
            raise ValueError(f"qkv_rope kernels need unit stride in the last dim, got strides {x.stride()}")


def qkv_rope_fwd_triton(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v_extra,
    n_head: int,
    n_kv_head: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """qkv: (B, T, (H + 2 Hkv) D) with contiguous rows; cos, sin: (1, T, 1, D/2); v_extra:
    (B, T, Hkv, D) or None. Returns contiguous q (B, T, H, D), k and v (B, T, Hkv, D), and the
    rstds of q's and k's heads, (B, T, H) and (B, T, Hkv) in fp32."""
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    if v_extra is not None and v_extra.stride()[-2:] != (D, 1):
        v_extra = v_extra.contiguous()
    _check_rows(qkv, cos, sin)
    q = qkv.new_empty(B, T, n_head, D)
    k = qkv.new_empty(B, T, n_kv_head, D)
    v = qkv.new_empty(B, T, n_kv_head, D)
    rq = qkv.new_empty(B, T, n_head, dtype=torch.float32)
    rk = qkv.new_empty(B, T, n_kv_head, dtype=torch.float32)
    vx = v_extra if v_extra is not None else v
    _qkv_rope_fwd_kernel[(B * T,)](
        qkv,
        cos,
        sin,
        vx,
        q,
        k,
        v,
        rq,
        rk,
        T,
        qkv.stride(0),
        qkv.stride(1),
        cos.stride(1),
        vx.stride(0),
        vx.stride(1),
        scale,
        eps,
        H=n_head,
        HKV=n_kv_head,
        HP=triton.next_power_of_2(n_head),
        HKVP=triton.next_power_of_2(n_kv_head),
        D=D,
        HAS_VX=v_extra is not None,
        num_warps=NUM_WARPS,
    )
    return q, k, v, rq, rk


def qkv_rope_bwd_triton(
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
    """The gradient of the q|k|v row (B, T, (H + 2 Hkv) D), contiguous, in q's dtype, from the
    gradients of q, k and v (any strides with a contiguous last dim: FlexAttention's come
    transposed) and the forward's contiguous q, k and rstds."""
    B, T, H, D = q.shape
    Hkv = k.size(2)
    _check_rows(dq, dk, dv, cos, sin)
    if not (q.is_contiguous() and k.is_contiguous() and rq.is_contiguous() and rk.is_contiguous()):
        raise ValueError("qkv_rope backward needs the forward's contiguous q, k and rstds")
    dqkv = q.new_empty(B, T, (H + 2 * Hkv) * D)
    _qkv_rope_bwd_kernel[(B * T,)](
        dq,
        dk,
        dv,
        q,
        k,
        rq,
        rk,
        cos,
        sin,
        dqkv,
        T,
        cos.stride(1),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        scale,
        H=H,
        HKV=Hkv,
        HP=triton.next_power_of_2(H),
        HKVP=triton.next_power_of_2(Hkv),
        D=D,
        num_warps=NUM_WARPS,
    )
    return dqkv
