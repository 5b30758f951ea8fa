"""The KV cache of the engine: a fixed number of slots, each holding one sequence at its own length.

Storage (`SlotCache`), per layer i: keys and values of shape (slots, n_kv_head, L_i, head_dim) in the
model's compute dtype (heads before rows, so a slot's keys per head are one contiguous block that a
batched matmul reads directly), where L_i = min(max_len, window_i + 1). A layer whose sliding window is
shorter than the cache keeps only its window, as a ring: absolute position p lives at row p % L_i.
Keys are stored after RoPE, and softmax does not care about key order, so a ring needs no
reordering. Per slot: `pos` (tokens written so far), the last token's pre-smear embedding (`prev`,
which smear mixes into the next token), the token to feed next (`tokens`) and whether the slot
decodes (`active`). All of these are device tensors that keep their addresses, so a decode step
can be captured once in a CUDA graph and replayed.

The model reads the cache through a view passed as `kv_cache=` (GPT.final_hidden calls `rotary`,
`smear`, `attend` and `finish`):

* `PrefillView`: fresh prompts of different lengths as one right-padded (B, T) batch. Attention is
  the training kernel over the batch itself (causal, so a row never sees the pads to its right);
  each row's real keys are then scattered into its slot.
* `DecodeView`: one token for each of slots [0, n), every slot at its own position. Each layer
  writes the new key at row pos % L_i and attends over its first `span` rows under the mask
  "row <= pos" (for a ring whose every row is filled that mask is all true and the rows hold
  exactly the window). Inactive slots compute too (the batch shape stays static) but neither move
  nor matter.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from chatlm.model.attention import causal_attention, single_query_attention


class SlotCache:
    """Keys, values and per-slot state for `slots` sequences of up to `max_len` tokens."""

    def __init__(self, model: Any, slots: int, max_len: int, device: Any = None):
        dims = model.dims
        device = torch.device(device) if device is not None else model.lm_head.weight.device
        dtype = model.compute_dtype
        self.slots, self.max_len, self.device = slots, max_len, device
        self.windows = tuple(dims.windows)
        self.lengths = tuple(min(max_len, w + 1) for w in self.windows)
        heads, dim = dims.n_kv_head, dims.head_dim
        self.k = [torch.zeros((slots, heads, n, dim), dtype=dtype, device=device) for n in self.lengths]
        self.v = [torch.zeros((slots, heads, n, dim), dtype=dtype, device=device) for n in self.lengths]
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.prev = torch.zeros((slots, 1, dims.n_embd), dtype=dtype, device=device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.rope_len = int(model.cos.size(1))

    def bytes(self) -> int:
        """Device memory held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_token(self) -> int:
        """Key + value bytes one more token of one sequence adds (over all layers, before rings fill)."""
        k = self.k[0]
        return 2 * len(self.k) * k.size(1) * k.size(3) * k.element_size()


class PrefillView:
    """Write fresh prompts into `slots`: a right-padded (B, T) batch whose row b has `lengths[b]` tokens."""

    def __init__(self, cache: SlotCache, slots: Sequence[int], lengths: Sequence[int]):
        if len(slots) != len(lengths) or not slots:
            raise ValueError("one length per slot, at least one slot")
        if max(lengths) > cache.max_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens does not fit the cache ({cache.max_len})")
        self.cache = cache
        self.slots = list(slots)
        self.lengths = list(lengths)
        device = cache.device
        self._last = torch.tensor([n - 1 for n in lengths], device=device)
        self._rows = torch.arange(len(slots), device=device)
        self._slot_ids = torch.tensor(self.slots, device=device)
        # per distinct layer length: (batch row, position) to read, (slot, ring row) to write
        self._scatter: dict[int, tuple[torch.Tensor, ...]] = {}
        for n in set(cache.lengths):
            src_b, src_t, dst_s, dst_r = [], [], [], []
            for b, (slot, length) in enumerate(zip(self.slots, self.lengths)):
                for t in range(max(0, length - n), length):
                    src_b.append(b)
                    src_t.append(t)
                    dst_s.append(slot)
                    dst_r.append(t % n)
            self._scatter[n] = tuple(
                torch.tensor(x, dtype=torch.long, device=device) for x in (src_b, src_t, dst_s, dst_r)
            )

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[:, :T], sin[:, :T]

    def smear(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Smear within each prompt (position 0 untouched); remember each row's last embedding."""
        self.cache.prev[self._slot_ids] = x[self._rows, self._last].unsqueeze(1)
        return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)

    def attend(self, layer: int, q, k, v, *, window: int, backend: str) -> torch.Tensor:
        n = self.cache.lengths[layer]
        src_b, src_t, dst_s, dst_r = self._scatter[n]
        self.cache.k[layer][dst_s, :, dst_r] = k[src_b, src_t]
        self.cache.v[layer][dst_s, :, dst_r] = v[src_b, src_t]
        return causal_attention(q, k, v, window=window, backend=backend)

    def finish(self, T: int) -> None:
        self.cache.pos[self._slot_ids] = torch.tensor(self.lengths, device=self.cache.device)

    def last_positions(self) -> torch.Tensor:
        """Each row's last real position (where its next-token logits are)."""
        return self._last


class DecodeView:
    """One new token for each of slots [0, n); full-length layers attend over their first `span` rows."""

    def __init__(self, cache: SlotCache, n: int, span: int):
        self.cache, self.n = cache, n
        self.pos = cache.pos[:n]
        self._masks: dict[int, torch.Tensor] = {}
        self._spans = {length: min(length, span) for length in set(cache.lengths)}

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        at = self.pos.clamp(max=self.cache.rope_len - 1)
        return cos[0, at].unsqueeze(1), sin[0, at].unsqueeze(1)  # (n, 1, 1, D/2)

    def smear(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        prev = self.cache.prev[: self.n]
        out = x + gate * prev.to(x.dtype)
        prev.copy_(x)
        return out

    def _mask(self, length: int) -> torch.Tensor:
        span = self._spans[length]
        if span not in self._masks:
            rows = torch.arange(span, device=self.pos.device)
            hidden = rows[None, :] > self.pos[:, None]
            dtype = self.cache.k[0].dtype if hidden.is_cuda else torch.float32  # see single_query_attention
            bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
            self._masks[span] = bias.masked_fill_(hidden, float("-inf")).view(self.n, 1, 1, span)
        return self._masks[span]

    def attend(self, layer: int, q, k, v, *, window: int, backend: str) -> torch.Tensor:
        cache, n = self.cache, self.n
        length = cache.lengths[layer]
        keys, values = cache.k[layer], cache.v[layer]
        at = self.pos % length
        rows = torch.arange(n, device=at.device)
        keys[rows, :, at] = k[:, 0]
        values[rows, :, at] = v[:, 0]
        span = self._spans[length]
        return single_query_attention(q, keys[:n, :, :span], values[:n, :, :span], self._mask(length))

    def finish(self, T: int) -> None:
        self.pos.add_(self.cache.active[: self.n].long())
