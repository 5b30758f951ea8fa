"""Generation without a KV cache, for models that only offer `model(idx) -> logits` (the table
models the scoring tests use as oracles); chatlm's GPT generates through `chatlm.engine.Engine`.
Also the attention-backend and logits helpers the evaluators share.

Each batch of prompts is right-padded into one (B, T) tensor and the whole tensor is forwarded
at every step, without a KV cache; row b reads its next-token logits at its own last position,
so its numbers are those of the row alone (causal attention never looks at the pads to its
right). That costs a full forward per step (quadratic in length), but every step serves every
row of the batch at once. Finished rows leave the batch.

Tool calls (nanochat's engine): when a row emits `<|python_end|>`, the text since its last
`<|python_start|>` is evaluated by `chatlm.engine.tools.calculate` and, if that gives a result,
`<|output_start|> result <|output_end|>` is forced into the row, one token per step, instead of
sampled tokens. Forced tokens are part of the output and count toward max_new_tokens.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from chatlm.engine.tools import ToolTokens


def model_max_len(model: Any) -> Optional[int]:
    """How many positions the model can attend over (its RoPE table), if it says."""
    cos = getattr(model, "cos", None)
    return int(cos.size(1)) if cos is not None else None


@contextlib.contextmanager
def inference_attention(model: Any) -> Iterator[Any]:
    """The model with an attention backend for changing shapes while inside (fa4, else sdpa;
    `chatlm.model.select_inference_backend`), its own backend restored after. A model trained
    with flex would otherwise compile once per new batch shape."""
    current = getattr(model, "attention_backend", None)
    if current != "flex":
        yield model
        return
    from chatlm.model import select_inference_backend

    weight = next(model.parameters())
    model.attention_backend = select_inference_backend(weight.device, getattr(model, "compute_dtype", weight.dtype))
    try:
        yield model
    finally:
        model.attention_backend = current


@torch.no_grad()
def span_logits(model: Any, idx: torch.Tensor, spans: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """fp32 logits at positions [s, e) of row b for each (b, s, e), in order. The head (the
    vocabulary-sized matmul and softcap) runs only on those positions when the model offers
    `final_hidden`/`head_logits` (chatlm's GPT); other models are forwarded whole. Computing every
    position's logits made large CPU batches slower than one example at a time (the softcap over
    B x T x V floats does not fit in cache)."""
    if hasattr(model, "final_hidden") and hasattr(model, "head_logits"):
        hidden = model.final_hidden(idx)
        picked = torch.cat([hidden[b, s:e] for b, s, e in spans])
        return list(model.head_logits(picked).float().split([e - s for _, s, e in spans]))
    logits = model(idx).float()
    return [logits[b, s:e] for b, s, e in spans]


def _decode_batch(
    model: Any,
    prompts: dict[int, list[int]],
    pad_id: int,
    max_new_tokens: int,
    sample: Callable[[torch.Tensor], torch.Tensor],
    stop: set[int],
    tools: Optional[ToolTokens],
    limit: Optional[int],
) -> dict[int, list[int]]:
    """One batch: prompt index -> new tokens. Every step forwards the right-padded active rows."""
    device = next(model.parameters()).device
    seqs = {i: list(p) for i, p in prompts.items()}
    out: dict[int, list[int]] = {i: [] for i in prompts}
    forced: dict[int, deque[int]] = {i: deque() for i in prompts}
    active = list(prompts)
    for _ in range(max_new_tokens):
        active = [i for i in active if limit is None or len(seqs[i]) < limit]
        if not active:
            break
        idx = torch.full((len(active), max(len(seqs[i]) for i in active)), pad_id, dtype=torch.long)
        for b, i in enumerate(active):
            idx[b, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
        last = span_logits(model, idx.to(device), [(b, len(seqs[i]) - 1, len(seqs[i])) for b, i in enumerate(active)])
        sampled = sample(torch.cat(last))
        still = []
        for i, token in zip(active, sampled.tolist()):
            if forced[i]:
                token = forced[i].popleft()
            seqs[i].append(token)
            if token in stop:
                continue
            out[i].append(token)
            if tools is not None and token == tools.python_end:
                forced[i].extend(tools.forced_after(out[i]))
            still.append(i)
        active = still
    return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token id per row from (B, V) logits -> (B,) int64.

    temperature 0: argmax. Otherwise softmax(logits[top-k] / temperature) and a multinomial draw
    with `generator`; top_k None or <= 0 means the full vocabulary.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k is not None and top_k > 0:
        k = min(int(top_k), logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        return indices.gather(-1, choice).squeeze(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_padded(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    tools: Optional[ToolTokens] = None,
    batch_size: int = 32,
) -> list[list[int]]:
    """New tokens for every prompt (stop token excluded), in input order (module docstring)."""
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature, top_k, generator)

    outputs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # similar lengths together
    was_training = model.training
    model.eval()
    try:
        with inference_attention(model):
            for at in range(0, len(order), batch_size):
                batch = {i: list(prompts[i]) for i in order[at : at + batch_size]}
                done = _decode_batch(
                    model, batch, pad_id, max_new_tokens, sample, set(stop_ids), tools, model_max_len(model)
                )
                for i, tokens in done.items():
                    outputs[i] = tokens
    finally:
        model.train(was_training)
    return outputs
