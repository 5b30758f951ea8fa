"""Next-token sampling for a batch of sequences, each with its own settings and seed.

Per row: temperature 0 is greedy (argmax of the logits, nanochat's greedy). Otherwise the logits
are divided by the temperature, restricted to the top_k most likely tokens (0 = no limit) and then
to the smallest set whose probability reaches top_p (1 = no limit; the most likely token always
stays), and one token is drawn from the renormalized distribution.

The draw is the Gumbel-max trick with noise from a counter-based hash of (seed, step, token id):
argmax(logits / T + G) with G = -log(-log(u)) is a sample of softmax(logits / T). The noise of a
row depends only on its own seed and how many tokens it has sampled, so a seeded request gives the
same tokens whatever else shares its batch, whenever it joins, on any device; there is no
generator state to carry, and the whole step can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 in (0, 1), a pure function of (seed, step, token id) per element."""
    seeds = seeds.long()
    key = _mix32((seeds & _M32) ^ 0x2545F491)
    key = _mix32(key ^ ((seeds >> 32) & _M32))
    key = _mix32(key ^ (steps.long() & _M32) ^ 0x1B873593)
    ids = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.long) ^ 0x68E31DA4)
    bits = _mix32(key[:, None] ^ ids[None, :])
    return ((bits >> 8).float() + 0.5) * (1.0 / 2**24)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seeds, steps, vocab)))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    variant: str = "filtered",
) -> torch.Tensor:
    """(B,) int64 tokens from (B, V) logits; every other argument is a (B,) tensor of per-row settings.

    `variant` (see `variant_for`): "filtered" handles every row; "plain" skips the sort that
    top-k/top-p need and "greedy" skips the noise too (exact when no row needs them)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if variant == "greedy":
        return greedy
    filtered = variant == "filtered"
    scaled = logits / temperature.float().clamp(min=1e-5)[:, None]
    noise = gumbel_noise(seeds, steps, logits.size(-1))
    if not filtered:
        drawn = (scaled + noise).argmax(dim=-1)
    else:
        vocab = logits.size(-1)
        values, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        keep = rank < k[:, None]
        values = values.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(values, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        keep = keep & ((before < top_p.float()[:, None]) | (rank == 0))
        choice = (values + noise.gather(1, order)).masked_fill(~keep, float("-inf")).argmax(dim=-1)
        drawn = order.gather(1, choice[:, None]).squeeze(1)
    return torch.where(temperature > 0, drawn, greedy)


def variant_for(rows: Iterable[tuple[float, int, float]]) -> str:
    """The cheapest `sample` variant exact for rows of (temperature, top_k, top_p)."""
    variant = "greedy"
    for temperature, top_k, top_p in rows:
        if temperature > 0:
            if top_k > 0 or top_p < 1.0:
                return "filtered"
            variant = "plain"
    return variant


def check_sampling(temperature: float, top_k: Optional[int], top_p: float) -> Optional[tuple[str, str]]:
    """(field, message) for settings `sample` cannot honour, or None."""
    if not temperature >= 0 or temperature != temperature:
        return "temperature", f"must be >= 0, got {temperature}"
    if top_k is not None and top_k < 0:
        return "top_k", f"must be >= 0 (0 = no limit), got {top_k}"
    if not 0 < top_p <= 1:
        return "top_p", f"must be in (0, 1], got {top_p}"
    return None
