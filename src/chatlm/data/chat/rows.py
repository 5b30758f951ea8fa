"""SFT rows: conversations rendered with their loss masks, packed whole into rows by best fit,
padded with BOS (never cropped), and served as (inputs, targets) batches that resume exactly.

nanochat packs as it streams; here each rank's packing is planned up front from the rendered
lengths (which conversations go into which row), because the plan also gives the exact horizon of
one pass (`steps=-1`), the padding waste and a loader state that is just a row cursor. Rank r packs
the conversations at r, r + W, r + 2W, ... (nanochat's split); every rank computes every rank's
plan, so all agree on the number of steps.

A conversation longer than a row (`capacity` = sequence length + 1 tokens) is cut after its last
assistant turn that fits (`overlong=truncate`), or dropped when none fits or `overlong=drop`; both
are counted and reported, so long data never silently starves the packer.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from chatlm.data.packing import LengthSortedBuffer
from chatlm.data.shards import DataError
from chatlm.tokenizer.chat_format import render_conversation

log = logging.getLogger("chatlm")


@dataclass
class RenderStats:
    conversations: int = 0
    truncated: int = 0  # cut at a turn boundary
    dropped: int = 0  # longer than a row with no complete assistant turn inside it (or overlong=drop)
    tokens: int = 0  # after truncation
    trained_tokens: int = 0  # mask 1


class Rendered:
    """Token ids and masks of conversations, concatenated, with offsets (conversation i is
    `ids[offsets[i]:offsets[i + 1]]`)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, stats: RenderStats):
        self.ids, self.mask, self.offsets, self.stats = ids, mask, offsets, stats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def fingerprint(self) -> str:
        """A short hash of every token and mask bit: a resumed run must see the same data."""
        h = hashlib.sha256()
        for arr in (self.ids, self.mask, self.offsets):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def cut_at_turn(ids: list[int], mask: list[int], limit: int, turn_end: int) -> Optional[int]:
    """Length of the longest prefix of at most `limit` tokens that ends with `<|assistant_end|>`
    (id `turn_end`), or None when no assistant turn ends within the limit."""
    for n in range(min(limit, len(ids)), 0, -1):
        if ids[n - 1] == turn_end and mask[n - 1] == 1:
            return n
    return None


def render_all(tok: Any, conversations: Sequence[Any], capacity: int, overlong: str = "truncate") -> Rendered:
    """Render every conversation (ids + mask); see the module docstring for over-long ones."""
    turn_end = tok.encode_special("<|assistant_end|>")
    stats = RenderStats()
    id_parts, mask_parts, lengths = [], [], [0]
    for conv in conversations:
        ids, mask = render_conversation(tok, conv, max_tokens=None)
        if len(ids) > capacity:
            n = cut_at_turn(ids, mask, capacity, turn_end) if overlong == "truncate" else None
            if n is None:
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, mask = ids[:n], mask[:n]
        id_parts.append(np.asarray(ids, dtype=np.int32))
        mask_parts.append(np.asarray(mask, dtype=np.int8))
        lengths.append(len(ids))
    stats.conversations = len(id_parts)
    ids_all = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32)
    mask_all = np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.int8)
    stats.tokens, stats.trained_tokens = int(ids_all.size), int(mask_all.sum())
    return Rendered(ids_all, mask_all, np.cumsum(lengths, dtype=np.int64), stats)


def plan_rows(order: Sequence[int], lengths: Sequence[int], capacity: int, buffer_size: int) -> list[list[int]]:
    """Rows of conversation indices: conversations arrive in `order` into a buffer of
    `buffer_size`; each row repeatedly takes the longest buffered conversation that still fits
    (the earliest of equal ones) until none does. Every conversation of `order` lands in a row."""
    buf = LengthSortedBuffer()
    stream = iter(order)
    rows: list[list[int]] = []
    while True:
        row: list[int] = []
        room = capacity
        while True:
            while len(buf) < buffer_size:
                j = next(stream, None)
                if j is None:
                    break
                if lengths[j] > capacity:
                    raise ValueError(f"conversation {j} has {lengths[j]} tokens, more than a row ({capacity})")
                buf.insert(int(lengths[j]), j)
            i = buf.largest_fitting(room)
            if i < 0:
                break
            j = buf.pop(i)
            row.append(j)
            room -= int(lengths[j])
        if not row:
            return rows
        rows.append(row)


def rank_rows(rendered: Rendered, capacity: int, buffer_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank `rank`'s rows: its conversations are every `world_size`-th, from index `rank`."""
    return plan_rows(range(rank, len(rendered), world_size), rendered.lengths, capacity, buffer_size)


def row_arrays(rendered: Rendered, row: Sequence[int], capacity: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs int32, targets int64) of one row, both `capacity - 1` long: the conversations back to
    back, BOS padding after them; targets are the next tokens, -1 where the target is context
    (mask 0) or padding."""
    ids = np.full(capacity, pad_id, dtype=np.int32)
    mask = np.zeros(capacity, dtype=np.int8)
    pos = 0
    for j in row:
        conv_ids, conv_mask = rendered.get(j)
        ids[pos : pos + conv_ids.size] = conv_ids
        mask[pos : pos + conv_ids.size] = conv_mask
        pos += conv_ids.size
    targets = ids[1:].astype(np.int64)
    targets[mask[1:] == 0] = -1
    return ids[:-1].copy(), targets


def padding_fraction(rendered: Rendered, rows: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the rows' token slots that are padding."""
    if not rows:
        return 0.0
    lengths = rendered.lengths
    content = sum(int(lengths[j]) for row in rows for j in row)
    return 1.0 - content / (len(rows) * capacity)


class SFTBatches:
    """(inputs, targets) batches of `batch_size` rows of one rank, on `device`, in plan order; after
    the last full batch the rows start over (a new epoch). The state is the row cursor and the data's
    fingerprint (a resumed run refuses different data)."""

    def __init__(
        self, rendered: Rendered, rows: list[list[int]], batch_size: int, capacity: int, pad_id: int, device: Any
    ):
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} rows cannot fill a batch of {batch_size}")
        self.rendered, self.rows, self.batch_size = rendered, rows, batch_size
        self.capacity, self.pad_id, self.device = capacity, pad_id, torch.device(device)
        self.fingerprint = rendered.fingerprint()
        self.cursor, self.epoch = 0, 0
        self._last: Optional[tuple[int, int]] = None  # (cursor, epoch) of the batch served last

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > len(self.rows):
            self.cursor, self.epoch = 0, self.epoch + 1
        self._last = (self.cursor, self.epoch)
        pairs = [
            row_arrays(self.rendered, self.rows[i], self.capacity, self.pad_id)
            for i in range(self.cursor, self.cursor + self.batch_size)
        ]
        self.cursor += self.batch_size
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs])).long()
        targets = torch.from_numpy(np.stack([p[1] for p in pairs]))
        pin = self.device.type == "cuda"
        if pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=pin), targets.to(self.device, non_blocking=pin)

    def state_dict(self, include_last_batch: bool = False) -> dict:
        cursor, epoch = self._last if include_last_batch and self._last is not None else (self.cursor, self.epoch)
        return {"kind": "sft", "cursor": cursor, "epoch": epoch, "rows": len(self.rows), "data": self.fingerprint}

    def _check(self, state: dict) -> None:
        if state.get("kind") != "sft":
            raise DataError(
                f"not an SFT loader state (kind {state.get('kind')!r}): resume continues an SFT run; "
                "start from another stage's checkpoint with init_from"
            )
        if state.get("data") != self.fingerprint:
            raise DataError(
                "the checkpoint was trained on other conversations (the mixture, its sources or the "
                "tokenizer changed): resume with the same mixture, or start a new run (resume=never)"
            )

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        self.cursor, self.epoch, self._last = int(state["cursor"]), int(state["epoch"]), None

    def continue_after(self, states: Sequence[dict]) -> None:
        """Resume on another number of ranks: skip as large a share of this rank's rows as the old
        ranks had consumed of theirs (the old and new plans differ, so this is approximate)."""
        for state in states:
            self._check(state)
        done = max(int(s["cursor"]) / max(1, int(s["rows"])) for s in states)
        self.cursor = min(len(self.rows), int(done * len(self.rows)))
        self.epoch = max(int(s["epoch"]) for s in states)
        self._last = None


def batches_of(rendered: Rendered, rows: list[list[int]], batch_size: int, capacity: int, pad_id: int, device: Any):
    """Every row once, in batches (the last may be smaller): validation."""
    for start in range(0, len(rows), batch_size):
        pairs = [row_arrays(rendered, row, capacity, pad_id) for row in rows[start : start + batch_size]]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs])).long()
        yield inputs.to(device), torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
