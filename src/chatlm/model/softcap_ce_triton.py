"""The Triton kernel behind `chatlm.model.softcap_ce`: softcapped cross-entropy per row that also
writes the gradient of the logits, in one launch.

One program per row of logits (one token). Pass 1 streams the row once and keeps a running max
and sum of exponentials per lane (online logsumexp of softcap * tanh(logit / softcap)). Pass 2
streams the row again, which mostly comes from L2 (a 32k-vocabulary bf16 row is 64 KiB), and
writes

    d loss_row / d logit = (softmax(z) - onehot(target)) * (1 - tanh(logit / softcap)^2)

in the logits' dtype, zero for padded vocabulary columns and for ignored rows (target -1). The
gradient may overwrite the logits themselves (each chunk is read before it is written).

Importing this module needs `triton`. Set TRITON_INTERPRET=1 before importing it to run the
kernel on CPU tensors (slowly), which is how the CPU tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: columns a program loads at a time; a power of two
BLOCK = 2048
NUM_WARPS = 8
_NEG = tl.constexpr(-1.0e30)  # stands for -inf in the running max (exp(-inf - -inf) would be nan)


@triton.jit
def _tanh(x):
    # exp-based, exact to fp32 rounding in absolute terms; saturates cleanly to +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tanh_approx(x):
    # the hardware's tanh.approx.f32 (one MUFU op; max relative error about 2^-11)
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _tanh_scaled(x, inv_softcap, FAST_TANH: tl.constexpr):
    # tanh(x / softcap), exact or with the hardware approximation
    if FAST_TANH:
        return _tanh_approx(x * inv_softcap)
    return _tanh(x * inv_softcap)


@triton.jit
def _softcap_ce_rows_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    loss_ptr,
    stride_logits,
    stride_grad,
    n_vocab,
    n_cols,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != -1
    offs = tl.arange(0, BLOCK_SIZE)

    # pass 1: per-lane running max and sum of exp over the real vocabulary
    run_max = tl.full([BLOCK_SIZE], _NEG, tl.float32)
    run_sum = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_vocab, BLOCK_SIZE):
        cols = start + offs
        in_vocab = cols < n_vocab
        z = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh_scaled(z, inv_softcap, FAST_TANH)
        z = tl.where(in_vocab, z, _NEG)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.where(in_vocab, tl.exp(z - new_max), 0.0)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))

    safe_target = tl.where(valid, target, 0)
    z_target = tl.load(logits_row + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = softcap * _tanh_scaled(z_target, inv_softcap, FAST_TANH)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))

    # pass 2: the gradient, over every column (padded ones get 0)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offs
        in_vocab = cols < n_vocab
        x = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh_scaled(x, inv_softcap, FAST_TANH)
            z = softcap * t
        else:
            z = x
        g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        g = tl.where(in_vocab & valid, g, 0.0)
        tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def softcap_ce_rows_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    vocab_size: int,
    grad: torch.Tensor,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
    fast_tanh: bool = False,
) -> torch.Tensor:
    """Per-row losses (fp32, 0 where target is -1); writes d loss_row / d logits into `grad`.

    logits, grad: (M, n_cols) with unit column stride (may be the same tensor); targets: (M,) ints.
    `block` and `num_warps` are the launch shape (launch/gpu/tune_loss_kernel.py times the choices).
    `fast_tanh` uses the hardware tanh.approx.f32 (CUDA only: the CPU interpreter has no inline
    PTX) instead of the exp-based tanh: about 0.7 ms less per d12 micro-batch, with row losses
    within 1e-4 and gradients within 1.2e-5 (relative L2) of the exact kernel's. The end-to-end
    gain was within machine-to-machine noise, so training keeps the exact tanh (docs/performance.md).
    """
    assert logits.dim() == 2 and logits.stride(1) == 1 and grad.stride(1) == 1 and grad.shape == logits.shape
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(block, triton.next_power_of_2(max(n_cols, 16)))
    _softcap_ce_rows_kernel[(rows,)](
        logits,
        grad,
        targets.contiguous(),
        loss,
        logits.stride(0),
        grad.stride(0),
        vocab_size,
        n_cols,
        float(softcap),
        1.0 / softcap if softcap > 0 else 0.0,
        HAS_SOFTCAP=softcap > 0,
        BLOCK_SIZE=block,
        FAST_TANH=fast_tanh,
        num_warps=num_warps,
    )
    return loss
