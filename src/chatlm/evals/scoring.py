"""Scoring many token rows with few forward passes: the batching that CORE and the multiple-choice
chat evals share.

A `Row` is one token sequence and the span `[start, end)` whose tokens are scored (a choice's
continuation, a task's answer). `score_rows` sorts the rows by length, packs them into batches of
at most `batch_size` rows and `max_batch_tokens` tokens (rows x the longest row), right-pads each
batch with `pad_id`, runs one forward pass per batch and returns, per row and in input order, the
mean cross-entropy over the span and whether greedy decoding reproduces every span token.

Right padding never changes a row's numbers: attention is causal, so a position sees only the
tokens before it, never the pads after it. The tests score the same rows at several batch sizes
and get the same per-row results.

A row longer than the model's position table keeps its last `max_len` tokens (the span shifts
with them; nanochat does the same for short-context models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from chatlm.engine.padded import inference_attention, model_max_len, span_logits


@dataclass
class Row:
    """Token ids and the span `[start, end)` of them that is scored (start >= 1: the first token
    of a sequence is never predicted)."""

    tokens: list[int]
    start: int
    end: int


@dataclass(frozen=True)
class RowScore:
    mean_loss: float  # mean cross-entropy (nats) of the span tokens
    greedy_match: bool  # argmax at every span position is the span token
    cropped: bool  # the row was longer than the model's positions and lost its first tokens


def batch_tokens(requested: int, device: Any) -> int:
    """Tokens per forward pass: `requested`, or for -1 16384 on a GPU and 2048 on a CPU, where a
    batch beyond the cache is no faster (docs/performance.md)."""
    if requested > 0:
        return int(requested)
    return 16384 if getattr(device, "type", str(device)) == "cuda" else 2048


def crop(row: Row, max_len: int) -> tuple[Row, bool]:
    """Keep the last max_len tokens of a row, shifting its span; (row, whether it was cropped)."""
    n = len(row.tokens) - max_len
    if n <= 0:
        return row, False
    return Row(row.tokens[n:], max(1, row.start - n), row.end - n), True


def batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches, longest rows first, each batch within both budgets
    (a single row longer than max_batch_tokens gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def _padded_batches(
    model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, max_batch_tokens: int, device: Any
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, right-padded ids on the device) per batch of `batches`, the model in eval mode
    (and on an inference attention backend) meanwhile."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with inference_attention(model):
            for batch in batches([len(s) for s in seqs], batch_size, max_batch_tokens):
                idx = torch.full((len(batch), max(len(seqs[i]) for i in batch)), pad_id, dtype=torch.long)
                for b, i in enumerate(batch):
                    idx[b, : len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
                yield batch, idx.to(device)
    finally:
        model.train(was_training)


@torch.no_grad()
def score_rows(
    model: Any,
    rows: Sequence[Row],
    pad_id: int,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    device: Any = None,
) -> list[RowScore]:
    """Mean span loss and greedy match of every row, in input order (see the module docstring)."""
    max_len = model_max_len(model)
    cropped = [crop(r, max_len) if max_len else (r, False) for r in rows]
    fitted = [r for r, _ in cropped]
    for r in fitted:
        if not 1 <= r.start < r.end <= len(r.tokens):
            raise ValueError(f"row span [{r.start}, {r.end}) does not fit {len(r.tokens)} tokens")
    scores: list[Optional[RowScore]] = [None] * len(rows)
    seqs = [r.tokens for r in fitted]
    for batch, idx in _padded_batches(model, seqs, pad_id, batch_size, max_batch_tokens, device):
        # position p predicts token p + 1, so the span [s, e) is predicted at [s - 1, e - 1)
        spans = [(b, fitted[i].start - 1, fitted[i].end - 1) for b, i in enumerate(batch)]
        for (b, i), logits in zip(enumerate(batch), span_logits(model, idx, spans)):
            targets = idx[b, fitted[i].start : fitted[i].end]
            loss = F.cross_entropy(logits, targets, reduction="mean").item()
            match = bool(torch.equal(logits.argmax(dim=-1), targets))
            scores[i] = RowScore(loss, match, cropped[i][1])
    return [s for s in scores if s is not None]


@torch.no_grad()
def last_position_logits(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    device: Any = None,
) -> list[torch.Tensor]:
    """The (V,) fp32 logits after each prompt's last token, in input order, batched as score_rows
    batches (right padding; a prompt longer than the model's positions keeps its end)."""
    max_len = model_max_len(model)
    fitted = [list(p)[-max_len:] if max_len else list(p) for p in prompts]
    out: list[Optional[torch.Tensor]] = [None] * len(prompts)
    for batch, idx in _padded_batches(model, fitted, pad_id, batch_size, max_batch_tokens, device):
        spans = [(b, len(fitted[i]) - 1, len(fitted[i])) for b, i in enumerate(batch)]
        for i, logits in zip(batch, span_logits(model, idx, spans)):
            out[i] = logits[0].cpu()
    return [t for t in out if t is not None]
