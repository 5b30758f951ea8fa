"""Batched autoregressive generation with the KV cache (spec §9.1-9.2) and training samples (§3.7).

The KV cache keeps one write position for the whole batch (`KVCache.pos`), so rows of one cache
must have prompts of the same length. Left-padding would need an attention mask over the pad
keys (the cache and the kernels have none), and right-padding would make rows decode at
different positions. `generate` therefore groups the prompts by length: each group is prefilled
in one batched forward and decoded together, one token column per step; prompts of different
lengths go to different groups. This is exact (no padding anywhere) and still batches the
common cases: many samples of one prompt, or equal-length prompts.

Sampling follows nanochat's Engine: temperature 0 is argmax; otherwise the top-k logits (or all
of them when top_k is None or 0) are divided by the temperature, softmaxed and sampled with a
seeded torch.Generator, one token per row independently.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

# The 7 fixed prompts nanochat samples (greedy, 16 tokens) at every evaluation (spec §3.7).
SAMPLE_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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


def _generate_group(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    generator: Optional[torch.Generator],
    stop: set[int],
    device: torch.device,
) -> list[list[int]]:
    """Same-length prompts in one batch: prefill once, then decode one column per step."""
    B, L = len(prompts), len(prompts[0])
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    # the last sampled token is never forwarded, hence - 1
    cache = model.new_kv_cache(B, L + max_new_tokens - 1)
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    logits = model(idx, kv_cache=cache)[:, -1, :]
    done = [False] * B
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, generator)
        for row, tok in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if tok in stop:
                done[row] = True  # the stop token itself is not returned
            else:
                out[row].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        # finished rows keep decoding (their tokens are discarded): the batch stays uniform
        logits = model(tokens.view(B, 1), kv_cache=cache)[:, -1, :]
    return out


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Continue every prompt by up to `max_new_tokens` tokens; returns only the new tokens.

    `model(idx, kv_cache=cache)` must return (B, T, V) logits and `model.new_kv_cache(B, max_len)`
    an empty cache (chatlm's GPT). A row stops at its first token in `stop_ids` (that token is
    not included in the result) or after `max_new_tokens`. temperature 0 is greedy; otherwise
    sampling uses a torch.Generator seeded with `seed` (None: a seed drawn from torch's global
    RNG, so `torch.manual_seed` also makes it reproducible). The model runs in eval mode under
    no_grad; its previous mode is restored. Prompt + new tokens must fit the model's RoPE table.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    device = _model_device(model)
    generator = None
    if temperature > 0:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    stop = {int(t) for t in stop_ids}

    # group rows by prompt length, in order of first appearance (deterministic sampling order)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)

    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for rows in groups.values():
                outs = _generate_group(
                    model, [prompts[i] for i in rows], max_new_tokens, temperature, top_k, generator, stop, device
                )
                for i, o in zip(rows, outs):
                    results[i] = o
    finally:
        model.train(was_training)
    return results


def sample_texts(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str] = SAMPLE_PROMPTS, max_new_tokens: int = 16
) -> list[str]:
    """nanochat's training-time samples: BOS + prompt, greedy, `max_new_tokens` tokens.

    Returns the decoded continuations only (the text after each prompt); a row stops early at
    BOS (a base model's end of document). Callers print `prompt + continuation`.
    """
    bos = tokenizer.bos_id
    ids = [[bos] + list(tokenizer.encode(p)) for p in prompts]
    with short_context_backend(model, max(map(len, ids)) + max_new_tokens):
        outs = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=(bos,))
    return [tokenizer.decode(o) for o in outs]


@contextlib.contextmanager
def short_context_backend(model: torch.nn.Module, length: int) -> Iterator[None]:
    """Use SDPA while every sequence fits inside the smallest attention window.

    Sliding windows then change nothing, so SDPA needs no mask, and an uncompiled model on GPU does
    not recompile FlexAttention for every new cache length (that cost ~25 s per sampling at d12).
    """
    windows = [m.window for m in model.modules() if hasattr(m, "window") and isinstance(m.window, int)]
    backend = getattr(model, "attention_backend", None)
    if backend is None or backend == "sdpa" or not windows or length > min(windows):
        yield
        return
    model.attention_backend = "sdpa"  # type: ignore[assignment]  # GPT's property setter takes a backend name
    try:
        yield
    finally:
        model.attention_backend = backend
