"""BOS-aligned best-fit packing of token documents into fixed-length rows.

Pretraining (`BestFitPacker`): every document arrives tokenized with BOS in front. A row holds
`capacity = T + 1` tokens (inputs are row[:-1], targets row[1:]). To fill a row we repeatedly take
the *largest* buffered document that still fits whole; when none fits, we take the *shortest*
one, crop it to fill the row exactly and throw its tail away. So every row starts with BOS (the
model never sees a document start mid-context without one), has no padding and needs no
attention masking between documents; the price is the cropped tails (about a third of the
tokens at T=2048 on web text, which the data is plentiful enough to afford).

SFT (`ConversationPacker`, `pack_conversations_row`): conversations are precious, so they are
never cropped across rows. Best-fit whole conversations; when none fits, the rest of the row is
padded with BOS and those positions get target -1 (ignored by the loss), as do all positions the
rendered mask marks as context. A conversation longer than a whole row is truncated to the row
when it enters the buffer, so it can always be placed in an empty row (nanochat kept such
conversations in its buffer forever and could emit fully padded rows).

Both packers keep their buffer sorted by length (bisect on a Python list, ties in arrival order),
so each pick is a binary search plus a memmove instead of a Python scan of the whole buffer, and
both expose `state_dict()`/`load_state_dict()` holding the exact buffer: restoring it together
with the upstream document position reproduces the uninterrupted stream row for row.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

STATE_VERSION = 1


class LengthSortedBuffer:
    """Items kept in ascending length order; equal lengths stay in insertion order.

    `lengths[i]` is the length of `items[i]`. Both lists are only ever changed together, by
    `insert` and `pop`, so a bisect on `lengths` finds items.
    """

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.items: list = []

    def __len__(self) -> int:
        return len(self.lengths)

    def insert(self, length: int, item) -> None:
        i = bisect.bisect_right(self.lengths, length)  # after equal lengths: arrival order
        self.lengths.insert(i, length)
        self.items.insert(i, item)

    def pop(self, i: int):
        del self.lengths[i]
        return self.items.pop(i)

    def largest_fitting(self, room: int) -> int:
        """Index of the earliest-arrived among the longest items with length <= room, or -1."""
        i = bisect.bisect_right(self.lengths, room)
        if i == 0:
            return -1
        return bisect.bisect_left(self.lengths, self.lengths[i - 1], 0, i)

    def clear(self) -> None:
        self.lengths.clear()
        self.items.clear()


MAX_EMPTY_REFILLS = 1000


def _refill(
    buffer: LengthSortedBuffer, add: Callable[[Iterable], None], target: int, refill: Optional[Callable[[], Iterable]]
) -> None:
    empty = 0
    while refill is not None and len(buffer) < target:
        before = len(buffer)
        batch = refill()  # an exhausted source raises StopIteration through to the caller...
        if batch is None:  # ...or returns None: then pack from what is buffered
            return
        add(batch)
        empty = empty + 1 if len(buffer) == before else 0
        if empty >= MAX_EMPTY_REFILLS:
            raise RuntimeError(f"refill() returned no documents {empty} times in a row")


# ----------------------------------------------------------------------------------------------
# pretraining


class BestFitPacker:
    """Best-fit-with-crop packer with an explicit, serializable buffer.

    Usage (one per rank / stream)::

        packer = BestFitPacker(bos_id=tok.bos_id, buffer_size=1000)
        row = packer.pack_row(T + 1, refill=lambda: tok.encode(next(texts), prepend=tok.bos_id))

    `refill` is called whenever the buffer holds fewer than `buffer_size` documents, before every
    pick, so which documents are candidates never depends on how the caller batches its calls.
    Without `refill` the packer uses what was `add`-ed and raises if it runs dry mid-row.

    Counters (`tokens_out`, `tokens_cropped`, `docs_in`, `docs_cropped`) measure the waste.
    """

    def __init__(self, bos_id: Optional[int] = None, buffer_size: int = 1000, dtype=np.int32):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.bos_id = bos_id
        self.buffer_size = buffer_size
        self.dtype = np.dtype(dtype)
        self._buf = LengthSortedBuffer()
        self.tokens_out = 0
        self.tokens_cropped = 0
        self.docs_in = 0
        self.docs_cropped = 0
        self.last_row_tokens = 0  # document tokens in the last row (< capacity only for a padded row)

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def buffered_tokens(self) -> int:
        return sum(self._buf.lengths)

    def add(self, docs: Iterable[Sequence[int]]) -> None:
        """Buffer tokenized documents (lists or arrays of ids, each starting with BOS)."""
        for doc in docs:
            arr = np.asarray(doc, dtype=self.dtype)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError("a document must be a non-empty 1-d sequence of token ids")
            if self.bos_id is not None and arr[0] != self.bos_id:
                raise ValueError(f"document does not start with BOS ({self.bos_id}): got {int(arr[0])}")
            self._buf.insert(arr.size, arr)
            self.docs_in += 1

    def pack_row(
        self,
        capacity: int,
        refill: Optional[Callable[[], Iterable[Sequence[int]]]] = None,
        out: Optional[np.ndarray] = None,
        pad: Optional[int] = None,
    ) -> np.ndarray:
        """Fill and return one row of exactly `capacity` tokens.

        With `out` the row is written into that array (e.g. a pinned staging buffer) and `out` is
        returned, so copy it before the next call if you keep it. An exhausted `refill` raises
        StopIteration; the partial row is then dropped. When the documents run out mid-row (refill
        returned None, or there is no refill) the packer raises RuntimeError, unless `pad` is
        given: then the rest of the row is filled with `pad` and `last_row_tokens` says how many
        document tokens the row holds (0: the buffer was already empty). Evaluation uses this to
        keep the last documents of a finite split.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        row = np.empty(capacity, dtype=self.dtype) if out is None else out
        if row.shape != (capacity,):
            raise ValueError(f"out has shape {row.shape}, expected ({capacity},)")
        buf = self._buf
        pos = 0
        while pos < capacity:
            _refill(buf, self.add, self.buffer_size, refill)
            if not buf:
                if pad is None:
                    raise RuntimeError("the packer's buffer ran dry mid-row; add() more documents or pass refill")
                row[pos:] = pad
                self.tokens_out += pos
                self.last_row_tokens = pos
                return row
            room = capacity - pos
            i = buf.largest_fitting(room)
            if i >= 0:
                doc = buf.pop(i)
                row[pos : pos + doc.size] = doc
                pos += doc.size
            else:  # nothing fits whole: crop the shortest so the least is thrown away
                doc = buf.pop(0)
                row[pos:] = doc[:room]
                pos = capacity
                self.tokens_cropped += doc.size - room
                self.docs_cropped += 1
        self.tokens_out += capacity
        self.last_row_tokens = capacity
        return row

    @property
    def waste(self) -> float:
        """Fraction of the tokens taken from documents that were cropped away."""
        total = self.tokens_out + self.tokens_cropped
        return self.tokens_cropped / total if total else 0.0

    def stats(self) -> dict:
        return {
            "tokens_out": self.tokens_out,
            "tokens_cropped": self.tokens_cropped,
            "docs_in": self.docs_in,
            "docs_cropped": self.docs_cropped,
            "waste": self.waste,
            "buffered_docs": len(self),
            "buffered_tokens": self.buffered_tokens,
        }

    def state_dict(self) -> dict:
        """The exact buffer (in its sorted order) and counters, as numpy arrays and ints.

        Take it between rows (e.g. when checkpointing), not per row: it copies the buffer. For a
        `torch.load(weights_only=True)` checkpoint convert the arrays with `torch.from_numpy`.
        """
        lengths = np.asarray(self._buf.lengths, dtype=np.int64)
        tokens = np.concatenate(self._buf.items) if self._buf.items else np.zeros(0, dtype=self.dtype)
        return {
            "version": STATE_VERSION,
            "kind": "best_fit",
            "lengths": lengths,
            "tokens": tokens,
            "tokens_out": self.tokens_out,
            "tokens_cropped": self.tokens_cropped,
            "docs_in": self.docs_in,
            "docs_cropped": self.docs_cropped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "best_fit":
            raise ValueError(f"not a best-fit packer state of version {STATE_VERSION}")
        lengths = np.asarray(state["lengths"], dtype=np.int64)
        tokens = np.asarray(state["tokens"], dtype=self.dtype)
        if int(lengths.sum()) != tokens.size:
            raise ValueError("packer state is inconsistent: lengths do not add up to the tokens")
        self._buf.clear()
        # the saved order is already sorted with ties in arrival order: append as is
        self._buf.lengths.extend(int(n) for n in lengths)
        self._buf.items.extend(np.split(tokens, np.cumsum(lengths)[:-1]) if lengths.size else [])
        for key in ("tokens_out", "tokens_cropped", "docs_in", "docs_cropped"):
            setattr(self, key, int(state[key]))


def pack_stream(
    doc_batches: Iterable[Iterable[Sequence[int]]],
    capacity: int,
    buffer_size: int = 1000,
    bos_id: Optional[int] = None,
    packer: Optional[BestFitPacker] = None,
) -> Iterator[np.ndarray]:
    """Rows of `capacity` tokens from an iterable of document batches, until it runs out.

    A convenience around `BestFitPacker` (benchmarks, tests, evaluation); a resumable loader
    drives the packer itself so it can record where its `refill` left the source.
    """
    packer = packer if packer is not None else BestFitPacker(bos_id=bos_id, buffer_size=buffer_size)
    batches = iter(doc_batches)
    while True:
        try:
            yield packer.pack_row(capacity, refill=lambda: next(batches))
        except StopIteration:
            return


# ----------------------------------------------------------------------------------------------
# SFT


def pack_conversations_row(
    buffer: LengthSortedBuffer,
    capacity: int,
    pad_id: int,
    refill: Optional[Callable[[], None]] = None,
    min_buffered: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One SFT row from a length-sorted buffer of `(ids, mask)` conversations.

    Best fit without cropping: repeatedly place the largest conversation that fits whole; when
    none does, pad the rest with `pad_id` (BOS). Every buffered conversation must be at most
    `capacity` long (the `ConversationPacker` truncates on entry), so an empty row always takes
    one and the packer cannot stall. `refill()` is called while fewer than `min_buffered`
    conversations are buffered; when it adds nothing or raises StopIteration the source counts as
    exhausted and the row is packed from what is left (so a finite SFT set drains completely).

    Returns `(inputs, targets, content_len)`: inputs (int32) are the row without its last token,
    targets (int64) the row shifted by one with -1 where the target token is context (mask 0) or
    padding, both of length `capacity - 1`; `content_len` counts the non-padding tokens.
    """
    ids = np.full(capacity, pad_id, dtype=np.int32)
    mask = np.zeros(capacity, dtype=np.int8)
    pos = 0
    while pos < capacity:
        if refill is not None:
            while len(buffer) < min_buffered:
                before = len(buffer)
                try:
                    refill()
                except StopIteration:
                    refill = None
                    break
                if len(buffer) == before:
                    break
        i = buffer.largest_fitting(capacity - pos)
        if i < 0:
            break
        conv_ids, conv_mask = buffer.pop(i)
        if conv_ids.size > capacity:
            raise ValueError(f"a buffered conversation of {conv_ids.size} tokens exceeds the row ({capacity})")
        ids[pos : pos + conv_ids.size] = conv_ids
        mask[pos : pos + conv_ids.size] = conv_mask
        pos += conv_ids.size
    targets = ids[1:].astype(np.int64)
    targets[mask[1:] == 0] = -1
    return ids[:-1].copy(), targets, pos


class ConversationPacker:
    """Best-fit SFT packer (pad, never crop) with a serializable buffer.

    Conversations longer than `capacity` are truncated to `capacity` on `add`: the tail of an
    over-long conversation is lost, but it can no longer sit in the buffer forever.
    """

    def __init__(self, capacity: int, pad_id: int, buffer_size: int = 100):
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 (inputs and targets), got {capacity}")
        self.capacity, self.pad_id, self.buffer_size = capacity, pad_id, buffer_size
        self._buf = LengthSortedBuffer()
        self.convs_in = 0
        self.convs_truncated = 0
        self.tokens_truncated = 0
        self.rows_out = 0
        self.pad_tokens = 0

    def __len__(self) -> int:
        return len(self._buf)

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        mask = np.asarray(mask, dtype=np.int8)
        if ids.shape != mask.shape or ids.ndim != 1 or ids.size == 0:
            raise ValueError("a conversation needs non-empty 1-d ids and a mask of the same length")
        if ids.size > self.capacity:
            self.convs_truncated += 1
            self.tokens_truncated += ids.size - self.capacity
            ids, mask = ids[: self.capacity], mask[: self.capacity]
        self._buf.insert(ids.size, (ids, mask))
        self.convs_in += 1

    def pack_row(self, refill: Optional[Callable[[], None]] = None) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs, targets)` of length `capacity - 1`; `refill()` should `add` more conversations."""
        if refill is None and not self._buf:
            raise RuntimeError("no conversations buffered")
        inputs, targets, content_len = pack_conversations_row(
            self._buf, self.capacity, self.pad_id, refill=refill, min_buffered=self.buffer_size
        )
        if content_len == 0:
            raise RuntimeError("no conversations left to pack")
        self.rows_out += 1
        self.pad_tokens += self.capacity - content_len
        return inputs, targets

    def state_dict(self) -> dict:
        lengths = np.asarray(self._buf.lengths, dtype=np.int64)
        items = self._buf.items
        ids = np.concatenate([c[0] for c in items]) if items else np.zeros(0, np.int32)
        mask = np.concatenate([c[1] for c in items]) if items else np.zeros(0, np.int8)
        return {
            "version": STATE_VERSION,
            "kind": "conversations",
            "lengths": lengths,
            "ids": ids,
            "mask": mask,
            "convs_in": self.convs_in,
            "convs_truncated": self.convs_truncated,
            "tokens_truncated": self.tokens_truncated,
            "rows_out": self.rows_out,
            "pad_tokens": self.pad_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "conversations":
            raise ValueError(f"not a conversation packer state of version {STATE_VERSION}")
        lengths = np.asarray(state["lengths"], dtype=np.int64)
        ids = np.asarray(state["ids"], dtype=np.int32)
        mask = np.asarray(state["mask"], dtype=np.int8)
        if int(lengths.sum()) != ids.size or ids.shape != mask.shape:
            raise ValueError("packer state is inconsistent: lengths do not add up to the tokens")
        cuts = np.cumsum(lengths)[:-1] if lengths.size else []
        self._buf.clear()
        self._buf.lengths.extend(int(n) for n in lengths)
        self._buf.items.extend(zip(np.split(ids, cuts), np.split(mask, cuts)) if lengths.size else [])
        for key in ("convs_in", "convs_truncated", "tokens_truncated", "rows_out", "pad_tokens"):
            setattr(self, key, int(state[key]))
