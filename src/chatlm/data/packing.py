"""BOS-aligned best-fit packing of token documents into fixed-length rows.

Pretraining (`BestFitPacker`): every document arrives tokenized with BOS in front. A row holds
`capacity = T + 1` tokens (inputs are row[:-1], targets row[1:]). To fill a row we repeatedly take
the *largest* buffered document that still fits whole; when none fits, we take the *shortest*
one, crop it to fill the row exactly and throw its tail away. So every row starts with BOS (the
model never sees a document start mid-context without one), has no padding and needs no
attention masking between documents; the price is the cropped tails (about a third of the
tokens at T=2048 on web text, which the data is plentiful enough to afford).

SFT rows are packed whole, never cropped, by `chatlm.data.chat.rows` with the same buffer.

The packer keeps its buffer sorted by length (bisect on a Python list, ties in arrival order),
so each pick is a binary search plus a memmove instead of a Python scan of the whole buffer, and
exposes `state_dict()`/`load_state_dict()` holding the exact buffer: restoring it together
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
