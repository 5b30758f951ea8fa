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
import logging
import math
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("chatlm")


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
    nats_sum, bytes_sum = float(total_nats.item()), float(total_bytes.item())
    if bytes_sum <= 0:
        return float("inf")
    return nats_sum / (math.log(2) * bytes_sum)


class ValidationBpb:
    """Bits per byte on the first `eval_tokens` of validation shards, all ranks together.

    A fresh loader each call (nanochat), so every evaluation scores the same tokens. A val split
    smaller than eval_tokens is scored whole: its last batch is padded with ignored targets (on 8
    GPUs at B=16, T=2048 the embedded split has no full batch at all), and the first such call logs
    how many tokens that was. `val_files` is [(val shard, source weight)]; `data` a DataConfig
    (doc buffer, tokenizer threads); `ctx` the rank's DistContext."""

    def __init__(
        self, val_files: list, tokenizer: Any, batch_size: int, seq_len: int, eval_tokens: int, data: Any, ctx: Any
    ):
        self.val_files, self.tok, self.data, self.ctx = val_files, tokenizer, data, ctx
        self.B, self.T, self.eval_tokens = batch_size, seq_len, eval_tokens
        self.steps = max(1, eval_tokens // (batch_size * seq_len * ctx.world_size))
        self.token_bytes = tokenizer.token_bytes_tensor(ctx.device)
        self.reported_short = False
        self.tokens_scored = 0  # this rank's tokens in the last call

    def __call__(self, model: torch.nn.Module) -> float:
        from chatlm.data.loader import rank_loader

        ctx = self.ctx
        val = rank_loader(
            [([f], w) for f, w in self.val_files],
            self.tok,
            self.B,
            self.T,
            ctx,
            self.data,
            infinite=False,
            pad_last=True,
        )
        bpb = evaluate_bpb(model, val, self.token_bytes, max_steps=self.steps)
        self.tokens_scored = val.packer.tokens_out
        if val.drained and not self.reported_short:
            self.reported_short = True
            log.info(
                "val bpb covers the whole val split: it ran out before eval_tokens=%d (rank %d of %d evaluated "
                "%d tokens of the %d asked of each rank); lower eval_tokens or add val data for a fixed-size "
                "evaluation",
                self.eval_tokens,
                ctx.rank,
                ctx.world_size,
                val.packer.tokens_out,
                self.steps * self.B * self.T,
            )
        return bpb
