"""Softcapped cross-entropy for training, without fp32 logits in memory (`model.loss_kernel`).

nanochat's loss is `F.cross_entropy(softcap * tanh(logits.float() / softcap), targets)` over
(B*T, V) logits. At d12 with a device batch of 32 that is 65,536 x 32,768 logits per micro-batch,
and the compiled expression spends about 8 ms per micro-batch streaming them several times
(docs/performance.md). The fused path computes the same mean loss and the same gradients with:

    forward    logits = x @ W^T in bf16 (cuBLAS); one kernel reads each row twice and writes the
               row's loss and, in the same place, the *unnormalized* gradient of its logits
               G = (softmax(z) - onehot(target)) * (1 - tanh^2)
    saved      G (the same bf16 buffer the logits were in; nothing else as big). The backward is
               not differentiable again (no double backward: G is treated as a constant).
    backward   grad_x = (G @ W) * s and grad_W = (G^T @ x) * s, where s = d loss / d sum of row
               losses (1 / number of counted targets, times whatever multiplies the loss): the
               scale is applied to the small (M, C) and (V, C) results, not to G (except in
               fp16, whose range cannot hold G^T @ x of the unscaled G)

That is `linear_softcap_ce`, used when lm_head is a plain `Linear`. When lm_head is something else
(a `Float8Linear`), `softcap_ce` takes its logits instead, writes G to a new buffer and scales G in
the backward: fewer savings, same results.

The kernel is Triton on CUDA (`softcap_ce_triton`); elsewhere, or without Triton, the same math
runs in PyTorch over chunks of rows (`softcap_ce_rows_torch`), which is also the reference the
Triton kernel is tested against. Both ops are `torch.library` custom ops with a fake
implementation, so torch.compile keeps them as one opaque node and traces their backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from chatlm.model.triton_check import triton_available

#: rows per chunk of the PyTorch implementation (bounds its fp32 temporaries)
TORCH_CHUNK_ROWS = 1024


def softcap_logits(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """fp32 logits squashed into (-softcap, softcap) by tanh (unchanged with softcap 0)."""
    logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def plain_softcap_ce(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float, reduction: str = "mean"
) -> torch.Tensor:
    """nanochat's expression: `F.cross_entropy` over `softcap_logits`, with ignore_index=-1."""
    logits = softcap_logits(logits, softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction)


def softcap_ce_rows_torch(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float, vocab_size: int, grad: torch.Tensor
) -> torch.Tensor:
    """The kernel's contract in PyTorch: per-row losses (fp32, 0 for target -1), and d loss_row /
    d logits written into `grad` (zero in columns >= vocab_size and in ignored rows).

    `grad` may be `logits` itself: each chunk is read in full before it is overwritten.
    """
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    for lo in range(0, rows, TORCH_CHUNK_ROWS):
        hi = min(rows, lo + TORCH_CHUNK_ROWS)
        x = logits[lo:hi, :vocab_size].float()
        t = targets[lo:hi].long()
        valid = t != -1
        safe = torch.where(valid, t, torch.zeros_like(t))
        if softcap > 0:
            tanh = torch.tanh(x / softcap)
            z = softcap * tanh
        else:
            z = x
        lse = torch.logsumexp(z, dim=-1)
        loss[lo:hi] = torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
        g = torch.exp(z - lse[:, None])
        g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
        if softcap > 0:
            g *= 1 - tanh * tanh
        g *= valid[:, None]
        grad[lo:hi, :vocab_size] = g.to(grad.dtype)
        grad[lo:hi, vocab_size:] = 0
    return loss


def softcap_ce_rows(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float, vocab_size: int, grad: torch.Tensor
) -> torch.Tensor:
    """Per-row losses and gradients (see `softcap_ce_rows_torch`): Triton on CUDA when available."""
    if logits.is_cuda and triton_available():
        from chatlm.model.softcap_ce_triton import softcap_ce_rows_triton

        return softcap_ce_rows_triton(logits, targets, softcap, vocab_size, grad)
    return softcap_ce_rows_torch(logits, targets, softcap, vocab_size, grad)


# ----------------------------------------------------------------------------------------------
# linear_softcap_ce: lm_head matmul + loss; G overwrites the logits


@torch.library.custom_op("chatlm::linear_softcap_ce", mutates_args=())
def linear_softcap_ce(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of row losses, G) for logits = x @ weight^T; x (M, C), weight (V_padded, C), targets (M,)."""
    logits = x @ weight.t()
    loss = softcap_ce_rows(logits, targets, softcap, vocab_size, grad=logits)
    return loss.sum(), logits


@linear_softcap_ce.register_fake
def _(x, weight, targets, softcap, vocab_size):
    return x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _no_double_backward() -> None:
    if torch.is_grad_enabled():  # only backward(create_graph=True) differentiates through a backward
        raise RuntimeError(
            "the fused softcap cross-entropy has no double backward (G is a constant); "
            "use model.loss_kernel=plain for higher-order gradients"
        )


def _linear_backward(ctx, grad_sum, _grad_g):
    _no_double_backward()
    x, weight, g = ctx.saved_tensors
    scale = grad_sum.float()
    if g.dtype == torch.float16:
        # fp16 cannot hold G^T @ x of the unscaled G (a frequent token times a steady channel passes
        # 65504 whatever the loss scale): scale G first, as the plain expression's gradient is
        g, scale = (g.float() * scale).to(g.dtype), torch.ones_like(scale)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = (g @ weight).float().mul_(scale).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (g.t() @ x).float().mul_(scale).to(weight.dtype)
    return grad_x, grad_w, None, None, None


linear_softcap_ce.register_autograd(_linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------------------------
# softcap_ce: loss from given logits (any lm_head); G is a new buffer


@torch.library.custom_op("chatlm::softcap_ce", mutates_args=())
def softcap_ce(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of row losses, G) for (M, V_padded) logits."""
    grad = torch.empty_like(logits)
    loss = softcap_ce_rows(logits, targets, softcap, vocab_size, grad=grad)
    return loss.sum(), grad


@softcap_ce.register_fake
def _(logits, targets, softcap, vocab_size):
    return logits.new_empty((), dtype=torch.float32), torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _logits_backward(ctx, grad_sum, _grad_g):
    _no_double_backward()
    (g,) = ctx.saved_tensors
    return (g.float() * grad_sum.float()).to(g.dtype), None, None, None


softcap_ce.register_autograd(_logits_backward, setup_context=_logits_setup)


# ----------------------------------------------------------------------------------------------
# entry point used by GPT.forward


def fused_softcap_ce(
    x: torch.Tensor,
    lm_head: Optional[Callable[[torch.Tensor], torch.Tensor]],
    targets: torch.Tensor,
    softcap: float,
    vocab_size: int,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean softcapped cross-entropy of lm_head(x) over targets != -1 (nan when there are none),
    equal to `plain_softcap_ce(lm_head(x)[..., :vocab_size], targets, softcap)`.

    Pass `weight` (lm_head's weight already in x's dtype) for the fused matmul path; without it
    the logits come from calling `lm_head`. Targets must lie in [-1, vocab_size): the PyTorch path
    raises on others, but the Triton kernel does not check them (a check would cost a host sync),
    where the plain expression's CUDA kernel would stop with a device-side assert.
    """
    x2 = x.reshape(-1, x.shape[-1])
    t = targets.reshape(-1)
    if weight is not None:
        total, _ = linear_softcap_ce(x2, weight, t, float(softcap), int(vocab_size))
    else:
        total, _ = softcap_ce(lm_head(x2), t, float(softcap), int(vocab_size))
    count = (t != -1).sum()
    # nan with no counted target, like F.cross_entropy, but with zero gradients (1/0 would make them nan)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
