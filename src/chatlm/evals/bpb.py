"""Bits per byte (spec §6.1, nanochat's loss_eval): a tokenizer-independent validation loss.

    bpb = sum of per-token cross-entropy (nats) over targets with token_bytes > 0
          / (ln 2 * sum of token_bytes over those targets)

Targets < 0 are ignored (padding / masked positions) and special tokens have 0 bytes, so neither
contributes to the numerator or the denominator. Under torch.distributed the two sums are
all-reduced (SUM) before the division, so every rank returns the bpb of the union of all ranks'
batches.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def evaluate_bpb(
    model: torch.nn.Module, batches: Iterable, token_bytes: torch.Tensor, max_steps: Optional[int] = None
) -> float:
    """Bits per byte of `model` over `batches` of (inputs, targets), each (B, T) int64.

    `model(x, y, loss_reduction='none')` must return the flat (B*T,) per-token CE in nats (GPT
    does). `token_bytes` is the (V,) int32/int64 byte length of every token id (0 for specials),
    on the model's device. At most `max_steps` batches are consumed (None: the whole iterable).
    Returns +inf when no target carried any byte (on every rank). The model runs in eval mode
    under no_grad; its previous train/eval mode is restored.
    """
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
    device = _model_device(model)
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    # fp64 accumulators (sums of ~1e7 terms); MPS has no fp64.
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=acc_dtype, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # islice: never pulls a batch beyond max_steps (a loader's state stays where it was)
            for x, y in itertools.islice(batches, max_steps):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                loss = model(x, y, loss_reduction="none").reshape(-1)
                y = y.reshape(-1)
                valid = y >= 0
                nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
                counted = nbytes > 0
                total_nats += torch.where(
                    counted, loss.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=device)
                ).sum()
                total_bytes += nbytes.sum().to(acc_dtype)
    finally:
        model.train(was_training)

    if dist.is_available() and dist.is_initialized():
        # one collective for both sums; they live on the model's device (what NCCL needs)
        sums = torch.stack([total_nats, total_bytes])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        total_nats, total_bytes = sums[0], sums[1]
    nats, nbytes = total_nats.item(), total_bytes.item()
    if nbytes <= 0:
        return float("inf")
    return nats / (math.log(2) * nbytes)
