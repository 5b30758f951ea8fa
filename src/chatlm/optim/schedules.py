"""Step schedules and the depth transfer of batch size, LR and weight decay (spec §3.2–3.5).

Everything here is a pure function of integers and floats so the training loop, tests and any
planning tool compute the same numbers.

Depth transfer: hyperparameters were tuned once on a d12 reference model trained on
D_ref = ratio · N_d12 tokens at B_ref = 2^19 tokens per step. A bigger model trains on more tokens
D, and then
* the batch grows as a power law in D (Power Lines, arXiv 2505.13738), rounded to a power of two,
* LRs grow as sqrt(B / B_ref) (the usual square-root rule for Adam-like optimizers),
* weight decay keeps the "number of epochs over the EMA timescale" fixed (arXiv 2405.13698):
  wd ∝ sqrt(B / B_ref) · D_ref / D, so the product lr·wd·steps stays at the reference value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# ----------------------------------------------------------------------------------------------
# LR multiplier


def _kind(kind) -> str:
    return getattr(kind, "value", kind)


def warmdown_iters(num_iterations: int, warmdown_ratio: float) -> int:
    """Length of the final linear decay, round(ratio · N)."""
    return round(warmdown_ratio * num_iterations)


def lr_multiplier(
    it: int,
    num_iterations: int,
    kind: str = "warmdown",
    warmup_steps: int = 40,
    warmdown_ratio: float = 0.65,
    final_lr_frac: float = 0.05,
) -> float:
    """Factor applied to every group's initial_lr at step `it` (0-based; `it` may reach N).

    All kinds start with a linear warmup (it+1)/warmup_steps for it < warmup_steps.
    * warmdown (nanochat): 1.0 until it <= N - round(ratio·N), then linear down to final_lr_frac at N.
    * cosine: half cosine from 1.0 after warmup down to final_lr_frac at N.
    * constant: 1.0 after warmup.
    """
    kind = _kind(kind)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, num_iterations - warmup_steps)
        progress = min(1.0, (it - warmup_steps) / span)
        return final_lr_frac + (1.0 - final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "warmdown":
        wd_iters = warmdown_iters(num_iterations, warmdown_ratio)
        if it <= num_iterations - wd_iters:
            return 1.0
        p = (num_iterations - it) / wd_iters
        return p + (1.0 - p) * final_lr_frac
    raise ValueError(f"unknown schedule kind {kind!r} (warmdown, cosine, constant)")


def lr_multiplier_from_config(schedule_cfg, it: int, num_iterations: int) -> float:
    """`lr_multiplier` with the fields of a `ScheduleConfig`."""
    return lr_multiplier(
        it,
        num_iterations,
        schedule_cfg.kind,
        schedule_cfg.warmup_steps,
        schedule_cfg.warmdown_ratio,
        schedule_cfg.final_lr_frac,
    )


# ----------------------------------------------------------------------------------------------
# Muon momentum and weight decay


def muon_momentum(
    it: int,
    num_iterations: int,
    warmdown_ratio: float = 0.65,
    start: float = 0.85,
    peak: float = 0.97,
    warmup_steps: int = 400,
    end: float = 0.90,
) -> float:
    """Muon momentum: start → peak linearly over `warmup_steps`, then peak, then peak → end over the
    LR warmdown. The warmup branch wins when a short run's warmdown begins before it ends.
    """
    if it < warmup_steps:
        frac = it / warmup_steps
        return (1.0 - frac) * start + frac * peak
    wd_iters = warmdown_iters(num_iterations, warmdown_ratio)
    wd_start = num_iterations - wd_iters
    if wd_iters > 0 and it >= wd_start:
        progress = min(1.0, (it - wd_start) / wd_iters)
        return (1.0 - progress) * peak + progress * end
    return peak


def muon_weight_decay(it: int, num_iterations: int, weight_decay: float) -> float:
    """Muon weight decay: cosine from `weight_decay` (the depth-scaled value) to 0 at N."""
    return weight_decay * 0.5 * (1.0 + math.cos(math.pi * it / num_iterations))


# ----------------------------------------------------------------------------------------------
# depth transfer and horizon


def auto_batch_size(
    target_tokens: float, ref_tokens: float, ref_batch_tokens: int = 2**19, exponent: float = 0.383
) -> int:
    """Tokens per step, B = 2^round(log2(B_ref · (D / D_ref)^exponent))."""
    return 2 ** round(math.log2(ref_batch_tokens * (target_tokens / ref_tokens) ** exponent))


def batch_lr_scale(batch_tokens: int, ref_batch_tokens: int = 2**19) -> float:
    """LR factor sqrt(B / B_ref) for the embedding, unembedding, scalar and matrix LRs."""
    return math.sqrt(batch_tokens / ref_batch_tokens)


def scaled_weight_decay(
    weight_decay: float, batch_tokens: int, target_tokens: float, ref_tokens: float, ref_batch_tokens: int = 2**19
) -> float:
    """Muon weight decay for this run: wd · sqrt(B / B_ref) · (D_ref / D)."""
    return weight_decay * math.sqrt(batch_tokens / ref_batch_tokens) * (ref_tokens / target_tokens)


def num_iterations(
    batch_tokens: int,
    steps: int = -1,
    target_flops: float = -1.0,
    flops_per_token: Optional[float] = None,
    target_param_data_ratio: float = -1.0,
    scaling_params: Optional[int] = None,
) -> int:
    """Training horizon. Precedence: explicit `steps` (> 0), then `target_flops` (> 0):
    round(flops / (flops_per_token · B)), then the data ratio: (ratio · N_scaling) // B.
    """
    if steps > 0:
        return int(steps)
    if target_flops > 0:
        if not flops_per_token:
            raise ValueError("target_flops needs flops_per_token")
        return round(target_flops / (flops_per_token * batch_tokens))
    if target_param_data_ratio > 0:
        if not scaling_params:
            raise ValueError("target_param_data_ratio needs scaling_params")
        return int(target_param_data_ratio * scaling_params) // batch_tokens
    raise ValueError("no horizon: give steps, target_flops or target_param_data_ratio > 0")


@dataclass(frozen=True)
class Transfer:
    """The numbers a run derives from its size (logged under `derived:`)."""

    target_tokens: int  # ratio · N_scaling
    ref_tokens: int  # ratio · N_scaling of the reference model
    batch_tokens: int  # B (auto or given)
    batch_lr_scale: float  # sqrt(B / B_ref)
    weight_decay: float  # Muon WD at step 0 (peak of the cosine)
    num_iterations: int


def depth_transfer(
    scaling_params: int,
    ref_scaling_params: int,
    target_param_data_ratio: float = 12.0,
    weight_decay: float = 0.28,
    total_batch_size: int = -1,
    ref_batch_tokens: int = 2**19,
    exponent: float = 0.383,
    steps: int = -1,
    target_flops: float = -1.0,
    flops_per_token: Optional[float] = None,
) -> Transfer:
    """Batch size, LR scale, Muon WD and horizon from the model's and the reference's scaling params.

    The reference (d12 with the same aspect ratio, head dim and sequence length) trains with the same
    data ratio, so D_ref = ratio · N_ref. `total_batch_size > 0` overrides the auto batch size.
    The WD and batch transfer always use the ratio-derived D, even when `steps` or `target_flops`
    set the horizon (nanochat does the same).
    """
    target_tokens = int(target_param_data_ratio * scaling_params)
    ref_tokens = int(target_param_data_ratio * ref_scaling_params)
    if total_batch_size > 0:
        batch = int(total_batch_size)
    else:
        batch = auto_batch_size(target_tokens, ref_tokens, ref_batch_tokens, exponent)
    return Transfer(
        target_tokens=target_tokens,
        ref_tokens=ref_tokens,
        batch_tokens=batch,
        batch_lr_scale=batch_lr_scale(batch, ref_batch_tokens),
        weight_decay=scaled_weight_decay(weight_decay, batch, target_tokens, ref_tokens, ref_batch_tokens),
        num_iterations=num_iterations(
            batch, steps, target_flops, flops_per_token, target_param_data_ratio, scaling_params
        ),
    )
