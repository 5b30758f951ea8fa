"""task=loss: the lm_head matmul + softcapped cross-entropy, forward and backward, per loss kernel.

At the model's training shapes (M = B*T rows of width C, the padded vocabulary V), each variant
computes the mean loss of `softcap * tanh((x @ W^T) / softcap)` and its gradients with respect to
x and W, compiled with torch.compile as the model is (on CUDA):

- `plain`        nanochat's expression: bf16 logits -> fp32 -> softcap -> `F.cross_entropy`
- `fused`        `chatlm::linear_softcap_ce` (the matmul inside; G overwrites the logits)
- `fused_logits` `F.linear`, then `chatlm::softcap_ce` on its logits (the path fp8 lm_heads take)

For each: the median fwd+bwd time (device events), the peak memory the call adds on top of its
inputs, and the difference from `plain` (loss, and relative L2 error of both gradients).
Inputs: x RMS-normalized like the final norm's output, W scaled so logits have std ~4 (trained
logits, not the 0.001-std init), targets uniform over the vocabulary.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from chatlm.bench.timing import median, sync, time_calls
from chatlm.bench.train_bench import device_name, kernel_bench_shapes
from chatlm.config import LOSS_BENCH_KERNELS, BenchConfig
from chatlm.model.softcap_ce import fused_softcap_ce, plain_softcap_ce
from chatlm.model.triton_check import triton_available

log = logging.getLogger("chatlm")


def loss_fn(variant: str, softcap: float, vocab: int) -> Callable[..., torch.Tensor]:
    """f(x, w, targets) -> mean loss for one variant (w is the fp32 master; cast as Linear does)."""
    if variant == "plain":

        def f(x, w, t):
            return plain_softcap_ce(F.linear(x, w.to(x.dtype))[:, :vocab], t, softcap)
    elif variant == "fused":

        def f(x, w, t):
            return fused_softcap_ce(x, None, t, softcap, vocab, weight=w.to(x.dtype))
    elif variant == "fused_logits":  # no weight: the logits come from calling the head

        def f(x, w, t):
            return fused_softcap_ce(x, lambda h: F.linear(h, w.to(h.dtype)), t, softcap, vocab)
    else:
        raise ValueError(f"unknown loss variant {variant!r}; choose from {LOSS_BENCH_KERNELS}")
    return f


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench_loss(cfg: BenchConfig, run: Any) -> dict:
    device, dtype, dims, B = kernel_bench_shapes(cfg, run, cfg.loss_batch_size)
    vocab, policy = dims.vocab_size, run.policy
    M, C, Vp, softcap = B * dims.sequence_len, dims.n_embd, dims.padded_vocab_size, cfg.model.softcap
    variants = list(cfg.loss_kernels) or list(LOSS_BENCH_KERNELS)
    log.info(
        "loss bench d%d: M=%d rows x C=%d -> V=%d (padded %d), softcap %g, %s, triton %s | %s",
        dims.n_layer,
        M,
        C,
        vocab,
        Vp,
        softcap,
        str(dtype).removeprefix("torch."),
        triton_available(),
        variants,
    )

    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    x = F.rms_norm(torch.randn(M, C, device=device, generator=gen), (C,)).to(dtype).requires_grad_(True)
    w = (torch.randn(Vp, C, device=device, generator=gen) * (4.0 / C**0.5)).requires_grad_(True)
    targets = torch.randint(0, vocab, (M,), device=device, generator=gen)

    results, outputs = [], {}
    for variant in variants:
        fn = loss_fn(variant, softcap, vocab)
        if policy.compile:
            fn = torch.compile(fn, dynamic=False)

        def fwd_bwd(fn: Any = fn) -> tuple[torch.Tensor, ...]:
            loss = fn(x, w, targets)
            return (loss.detach(), *torch.autograd.grad(loss, (x, w)))

        entry: dict[str, Any] = {"variant": variant}
        times = time_calls(fwd_bwd, cfg.loss_iters, cfg.loss_warmup, device)
        entry.update(fwd_bwd_s=median(times), fwd_bwd_times_s=times)
        if device.type == "cuda":
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fwd_bwd()
            sync(device)
            entry["extra_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        else:
            out = fwd_bwd()
        outputs[variant] = out
        if "plain" in outputs and variant != "plain":
            ref = outputs["plain"]
            entry.update(
                loss_diff=float((out[0] - ref[0]).abs()),
                grad_x_rel=_rel(out[1], ref[1]),
                grad_w_rel=_rel(out[2], ref[2]),
            )
        entry["loss"] = float(out[0])
        log.info(
            "%s: fwd+bwd %.3f ms%s",
            variant,
            1000 * entry["fwd_bwd_s"],
            f", +{entry['extra_peak_gib']:.2f} GiB peak" if "extra_peak_gib" in entry else "",
        )
        results.append(entry)
    return {
        "task": "loss",
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "model": cfg.model.name,
        "depth": dims.n_layer,
        "dtype": policy.dtype_name,
        "compile": policy.compile,
        "batch": B,
        "seq_len": dims.sequence_len,
        "rows": M,
        "n_embd": C,
        "vocab_size": vocab,
        "padded_vocab_size": Vp,
        "softcap": softcap,
        "triton": triton_available(),
        "iters": cfg.loss_iters,
        "warmup": cfg.loss_warmup,
        "results": results,
    }
