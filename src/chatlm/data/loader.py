"""The pretraining loader: shards -> documents -> BOS best-fit rows -> (inputs, targets) on device.

Per rank (nanochat §4.2-4.3):
- read this rank's row groups (r, r+W, r+2W, ... of every shard, in order), forever: after the last
  shard the epoch counter goes up and reading starts again at the first;
- tokenize each row group in one multi-threaded tiktoken batch, BOS in front of every document;
- pack rows of T+1 tokens with `BestFitPacker` (largest document that fits, else crop the shortest);
- inputs = row[:-1], targets = row[1:], written into a pinned staging buffer and copied to the
  device with one non-blocking copy per batch.

Resuming is exact: the state is the last row group consumed, the epoch and the packer's buffer
(every document read but not yet packed), so a resumed loader yields exactly the batches an
uninterrupted one would have. Whole row groups go into the buffer at once, so nothing is ever
half-read outside it.

A `DocumentStream` is one source's reader (files, rank's row groups, position, epoch). The
`PretrainLoader` packs one stream; the `MixtureLoader` packs several weighted streams into one
packer, taking every refill from the stream that is furthest behind its share of the tokens
(deterministic; the counts are part of the state). `make_loader` picks the right one.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from chatlm.data.packing import BestFitPacker
from chatlm.data.shards import DataError, iter_row_groups

STATE_VERSION = 1  # PretrainLoader's state (unchanged by the DocumentStream refactor)
IGNORE = -1  # target of a padded position (the loss and bpb skip it); its input is BOS
MIXTURE_STATE_VERSION = 1


_POOLS: dict[int, ThreadPoolExecutor] = {}
_READ_AHEAD: list[ThreadPoolExecutor] = []


def _tokenizer_pool(threads: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix=f"chatlm-tokenize{threads}"))
    return pool


def _read_ahead_pool() -> ThreadPoolExecutor:
    """The process-wide threads that read and tokenize the next row group of each stream."""
    if not _READ_AHEAD:
        _READ_AHEAD.append(ThreadPoolExecutor(4, thread_name_prefix="chatlm-read-ahead"))
    return _READ_AHEAD[0]


@dataclass
class _Read:
    """One row group read ahead: its documents and where the stream stands after it."""

    docs: Optional[list]
    position: Optional[tuple[int, int]]
    epoch: int
    exhausted: bool = False


class DocumentStream:
    """One source's tokenized row groups for one rank, with an exact, serializable position.

    `next_documents()` returns the next row group's documents (each an int32 array of ids starting
    with BOS), or None once a finite stream has read everything. An infinite stream starts over at the
    first file and counts an epoch.

    Read-ahead (`read_ahead=True`, the default for infinite streams): while the caller packs one row
    group, a background thread reads and tokenizes the next. Refills then cost the training loop
    only the hand-over instead of a burst of tokenization every few steps (on a GPU, the host work
    is hidden behind the queued device work). The position stays exact: the state is that of the
    row groups handed out, and a read-ahead row group is read again after a resume.
    """

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer: Any,
        *,
        rank: int = 0,
        world_size: int = 1,
        threads: int = 4,
        infinite: bool = True,
        name: str = "",
        read_ahead: Optional[bool] = None,
    ):
        if not files:
            raise DataError(f"the loader got no shard files{f' for source {name}' if name else ''}")
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self.threads = threads
        self.infinite = infinite
        self.name = name
        self.read_ahead = infinite if read_ahead is None else read_ahead
        self.position: Optional[tuple[int, int]] = None  # last (file, row group) handed out
        self.epoch = 1
        self.row_groups_read = 0
        self.exhausted = False  # a finite stream has read everything
        self._row_groups: Optional[Iterator] = None
        # the reader's own cursor, ahead of the committed position by the row group in flight
        self._ahead_position: Optional[tuple[int, int]] = None
        self._ahead_epoch = 1
        self._pending: Optional[Future] = None

    def _encode(self, texts: list[str]) -> list:
        """The row group's documents as int32 arrays, BOS first (what `Tokenizer.encode(texts,
        prepend=bos)` returns, converted once). tiktoken's batch encoder submits one thread-pool task
        per document and builds a new pool per call; here each thread encodes a contiguous chunk
        with `encode_ordinary` (which releases the GIL) on a process-wide pool of that many threads
        (shared by all loaders, so loaders made per evaluation leak no threads), and one thread
        encodes inline."""
        tok = self.tokenizer
        enc = getattr(tok, "enc", None)
        if enc is None or not hasattr(enc, "encode_ordinary"):  # another tokenizer: its own batch encode
            return tok.encode(texts, prepend=tok.bos_id, num_threads=self.threads)
        encode = enc.encode_ordinary
        if self.threads <= 1 or len(texts) < 2:
            rows = [encode(t) for t in texts]
        else:
            pool = _tokenizer_pool(self.threads)
            n_chunks = min(len(texts), 4 * self.threads)  # a few chunks per thread evens out long documents
            bounds = np.linspace(0, len(texts), n_chunks + 1).astype(int)
            chunks = pool.map(lambda ab: [encode(t) for t in texts[ab[0] : ab[1]]], zip(bounds[:-1], bounds[1:]))
            rows = [row for chunk in chunks for row in chunk]
        bos = tok.bos_id
        docs = []
        for row in rows:
            doc = np.empty(len(row) + 1, dtype=np.int32)
            doc[0] = bos
            doc[1:] = row
            docs.append(doc)
        return docs

    def _read_next(self) -> _Read:
        """Read and tokenize the row group after the reader's cursor (on the read-ahead thread)."""
        while True:
            if self._row_groups is None:
                self._row_groups = iter_row_groups(self.files, self.rank, self.world_size, start=self._ahead_position)
            try:
                texts, pos = next(self._row_groups)
            except StopIteration:
                if self._ahead_position is None and not self.infinite:
                    return _Read(None, None, self._ahead_epoch, exhausted=True)  # a split smaller than the world
                if self._ahead_position is None:
                    what = f"source {self.name!r} " if self.name else ""
                    raise DataError(
                        f"rank {self.rank} of {self.world_size} has no row groups to read in "
                        f"{what}{len(self.files)} shard(s): use fewer ranks or more data"
                    ) from None
                if not self.infinite:
                    return _Read(None, self._ahead_position, self._ahead_epoch, exhausted=True)
                self._ahead_epoch += 1
                self._ahead_position = None
                self._row_groups = None
                continue
            self._ahead_position = pos
            return _Read(self._encode(texts), pos, self._ahead_epoch)

    def next_documents(self) -> Optional[list]:
        if self.exhausted:
            return None
        read = self._pending.result() if self._pending is not None else self._read_next()
        self._pending = None
        if read.exhausted:
            self.exhausted = True
            return None
        self.position, self.epoch = read.position, read.epoch
        self.row_groups_read += 1
        if self.read_ahead:
            self._pending = _read_ahead_pool().submit(self._read_next)
        return read.docs

    def _restart_reader(self) -> None:
        """Drop the read-ahead row group and point the reader back at the committed position."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - its error belongs to a read that will be made again
                pass
            self._pending = None
        self._row_groups = None
        self._ahead_position, self._ahead_epoch = self.position, self.epoch

    def state_dict(self) -> dict:
        return {
            "files": [f.name for f in self.files],
            "position": self.position,
            "epoch": self.epoch,
            "row_groups_read": self.row_groups_read,
        }

    def _check_files(self, state: dict) -> None:
        names = [f.name for f in self.files]
        if list(state["files"]) != names:
            what = f" of source {self.name!r}" if self.name else ""
            raise DataError(
                f"loader state was saved on shards {list(state['files'])[:3]}... but the data{what} "
                f"now has {names[:3]}...: the shard set changed, so the stream cannot be resumed "
                f"exactly"
            )

    def load_state_dict(self, state: dict) -> None:
        self._check_files(state)
        self.position = tuple(int(p) for p in state["position"]) if state["position"] is not None else None
        self.epoch = int(state["epoch"])
        self.row_groups_read = int(state["row_groups_read"])
        self.exhausted = False
        self._restart_reader()

    def continue_after(self, states: Sequence[dict]) -> None:
        """Continue the streams of another number of ranks (`states`: each old rank's
        `state_dict()`): start after the furthest row group any of them had read, in this rank's
        stride. Nothing is read twice; what is skipped is the row groups the lagging old ranks had
        not reached, and the rest of the furthest one's stride block (at most a few per rank)."""
        nowhere = (-1, -1)  # position None: nothing read yet in that epoch
        for state in states:
            self._check_files(state)
        epoch, position = max((int(s["epoch"]), tuple(int(p) for p in s["position"] or nowhere)) for s in states)
        self.epoch, self.position = epoch, None if position == nowhere else position
        self.row_groups_read = sum(int(s["row_groups_read"]) for s in states) // self.world_size
        self.exhausted = False
        self._restart_reader()


class _PackedLoader:
    """Packing, double-buffered batches and the pending-rows part of resuming; subclasses supply
    `_documents()` (the packer's refill) and their own state."""

    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        *,
        rank: int,
        world_size: int,
        device: torch.device | str,
        buffer_size: int,
        threads: int,
        infinite: bool,
        pad_last: bool,
    ):
        if pad_last and infinite:
            raise ValueError("pad_last is for finite loaders (infinite=False): an infinite one never runs out")
        self.tokenizer = tokenizer
        self.pad_last = pad_last
        self.drained = False  # pad_last: the documents ran out; the last batch was padded
        self.B, self.T = int(batch_size), int(seq_len)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.threads = threads
        self.infinite = infinite
        self.packer = BestFitPacker(bos_id=tokenizer.bos_id, buffer_size=buffer_size)
        self._pending: Optional[np.ndarray] = None  # rows to hand out before packing new ones (resume)
        self._last_rows: Optional[np.ndarray] = None
        # double-buffered host rows and device batches (see PretrainLoader's docstring)
        self._rows = [np.empty((self.B, self.T + 1), dtype=np.int32) for _ in range(2)]
        pin = self.device.type == "cuda"
        self._staging = [torch.empty(2 * self.B * self.T, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._on_device = (
            [torch.empty(2 * self.B * self.T, dtype=torch.int64, device=self.device) for _ in range(2)]
            if pin
            else self._staging
        )
        self._copied = [None, None]  # CUDA events: staging k may be rewritten once its copy is done
        self._slot = 0

    def _documents(self) -> Optional[list[list[int]]]:
        raise NotImplementedError

    @property
    def _exhausted(self) -> bool:
        raise NotImplementedError

    def next_rows(self) -> np.ndarray:
        """The next (B, T+1) block of packed rows (host memory)."""
        rows = self._rows[self._slot]
        if self._pending is not None:
            rows[:] = self._pending
            self._pending = None
            self._last_rows = rows
            return rows
        if self.drained:
            raise StopIteration
        pad = IGNORE if self.pad_last else None
        for b in range(self.B):
            try:
                self.packer.pack_row(self.T + 1, refill=self._documents, out=rows[b], pad=pad)
            except RuntimeError:
                if not self._exhausted:
                    raise
                raise StopIteration from None  # a finite loader ran out: the partial batch is dropped
            if pad is not None and self.packer.last_row_tokens <= self.T:  # ran out in this row
                self.drained = True
                if b == 0 and self.packer.last_row_tokens < 2:  # not one target left to predict
                    raise StopIteration
                rows[b + 1 :] = IGNORE
                break
        self._last_rows = rows
        return rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (B, T), int64, on the loader's device."""
        slot = self._slot
        rows = self.next_rows()
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        staging = self._staging[slot]
        host = staging.numpy().reshape(2, self.B, self.T)
        host[0] = rows[:, :-1]
        host[1] = rows[:, 1:]
        if self.drained:  # padded rows: BOS in, nothing to predict
            np.copyto(host[0], self.tokenizer.bos_id, where=host[0] == IGNORE)
        out = self._on_device[slot]
        if out is not staging:
            out.copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copied[slot] = event
        self._slot = 1 - slot
        n = self.B * self.T
        return out[:n].view(self.B, self.T), out[n:].view(self.B, self.T)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def _pending_state(self, include_last_batch: bool) -> Optional[np.ndarray]:
        pending = self._pending
        if include_last_batch and self._last_rows is not None:
            pending = self._last_rows
        return None if pending is None else pending.copy()

    def _load_pending(self, pending: Any) -> None:
        self._pending = None if pending is None else np.asarray(pending, dtype=np.int32).reshape(self.B, self.T + 1)

    def _check_rank(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise DataError(
                f"loader state is for rank {state['rank']} of {state['world_size']}, "
                f"not rank {self.rank} of {self.world_size}"
            )


class PretrainLoader(_PackedLoader):
    """Batches of (inputs, targets), each (B, T) int64 on `device`, from one shard set.

    The returned tensors live in one of two alternating buffers: a batch stays valid while the next
    one is produced, and is overwritten by the one after. Clone it to keep it longer.
    """

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        buffer_size: int = 1000,
        threads: int = 4,
        infinite: bool = True,
        pad_last: bool = False,
        state: Optional[dict] = None,
    ):
        self.stream = DocumentStream(
            files, tokenizer, rank=rank, world_size=world_size, threads=threads, infinite=infinite
        )
        self.files = self.stream.files
        super().__init__(
            tokenizer,
            batch_size,
            seq_len,
            rank=rank,
            world_size=world_size,
            device=device,
            buffer_size=buffer_size,
            threads=threads,
            infinite=infinite,
            pad_last=pad_last,
        )
        if state is not None:
            self.load_state_dict(state)

    # the stream's position, exposed as before the refactor
    @property
    def position(self) -> Optional[tuple[int, int]]:
        return self.stream.position

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def row_groups_read(self) -> int:
        return self.stream.row_groups_read

    @property
    def _exhausted(self) -> bool:
        return self.stream.exhausted

    def _documents(self) -> Optional[list[list[int]]]:
        """The next row group of this rank, tokenized (the packer's refill); None when a finite
        loader has read everything (the packer then empties its buffer)."""
        return self.stream.next_documents()

    # -- resuming ------------------------------------------------------------------------------

    def state_dict(self, include_last_batch: bool = False) -> dict:
        """Where the stream is. With `include_last_batch` the most recent batch is stored too and is
        handed out again first after loading: a training loop that prefetches its next batch saves
        the state as of *before* that prefetch, so a resumed run sees that batch."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            **self.stream.state_dict(),
            "packer": self.packer.state_dict(),
            "pending_rows": self._pending_state(include_last_batch),
        }

    def _check_kind(self, state: dict) -> None:
        if state.get("kind") == "mixture":
            raise DataError(
                f"loader state is a mixture of {len(state.get('sources', []))} sources but the data "
                f"now has one source: resume with the same data.sources"
            )
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}")

    def continue_after(self, states: Sequence[dict]) -> None:
        """Pick up the data stream of a run on another number of ranks (see `DocumentStream.continue_after`);
        their packing buffers are not carried over. Call on a new loader, before its first batch."""
        for state in states:
            self._check_kind(state)
        self.stream.continue_after(states)

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)
        self._check_rank(state)
        self.stream.load_state_dict(state)
        self.packer.load_state_dict(state["packer"])
        self._load_pending(state.get("pending_rows"))

    @property
    def stats(self) -> dict:
        return {"epoch": self.epoch, "row_groups_read": self.row_groups_read, **self.packer.stats()}


class MixtureLoader(_PackedLoader):
    """Like `PretrainLoader`, but over several weighted sources packed into one `BestFitPacker`.

    `sources` is a list of `(files, weight)`. Every packer refill takes one row group from the
    source with the smallest `tokens_drawn / weight` (ties: the first), so each source's share of
    the tokens follows its weight to within one row group, whatever the sources' row-group sizes.
    Each source keeps its own position and epochs; in finite mode an exhausted source drops out
    (the others keep their relative weights) and the loader ends when all have run out.
    """

    def __init__(
        self,
        sources: Sequence[tuple[Sequence[Path], float]],
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        buffer_size: int = 1000,
        threads: int = 4,
        infinite: bool = True,
        pad_last: bool = False,
        state: Optional[dict] = None,
    ):
        if not sources:
            raise DataError("the mixture loader got no sources")
        self.weights = [float(w) for _, w in sources]
        if any(not w > 0 for w in self.weights):
            raise DataError(f"every source weight must be > 0, got {self.weights}")
        self.streams = [
            DocumentStream(
                files, tokenizer, rank=rank, world_size=world_size, threads=threads, infinite=infinite, name=f"#{i}"
            )
            for i, (files, _) in enumerate(sources)
        ]
        self.tokens_drawn = [0] * len(self.streams)
        self.docs_drawn = [0] * len(self.streams)
        super().__init__(
            tokenizer,
            batch_size,
            seq_len,
            rank=rank,
            world_size=world_size,
            device=device,
            buffer_size=buffer_size,
            threads=threads,
            infinite=infinite,
            pad_last=pad_last,
        )
        if state is not None:
            self.load_state_dict(state)

    @property
    def _exhausted(self) -> bool:
        return all(s.exhausted for s in self.streams)

    def _next_source(self) -> int:
        best, best_key = -1, 0.0
        for i, s in enumerate(self.streams):
            if s.exhausted:
                continue
            key = self.tokens_drawn[i] / self.weights[i]
            if best < 0 or key < best_key:
                best, best_key = i, key
        return best

    def _documents(self) -> Optional[list[list[int]]]:
        while True:
            i = self._next_source()
            if i < 0:
                return None
            docs = self.streams[i].next_documents()
            if docs is None:  # finite mode: this source ran out, the others carry on
                continue
            self.tokens_drawn[i] += sum(len(d) for d in docs)
            self.docs_drawn[i] += len(docs)
            return docs

    def state_dict(self, include_last_batch: bool = False) -> dict:
        """Like `PretrainLoader.state_dict`, with every source's position and token count."""
        return {
            "version": MIXTURE_STATE_VERSION,
            "kind": "mixture",
            "rank": self.rank,
            "world_size": self.world_size,
            "sources": [
                {**s.state_dict(), "dir": s.files[0].parent.name, "weight": w, "tokens_drawn": t, "docs_drawn": d}
                for s, w, t, d in zip(self.streams, self.weights, self.tokens_drawn, self.docs_drawn)
            ],
            "packer": self.packer.state_dict(),
            "pending_rows": self._pending_state(include_last_batch),
        }

    def _check_sources(self, state: dict) -> None:
        if state.get("kind") != "mixture":
            raise DataError(
                f"loader state is for a single source but the data now has {len(self.streams)} "
                f"sources: resume with the same data.sources"
            )
        if state.get("version") != MIXTURE_STATE_VERSION:
            raise DataError(f"mixture loader state version {state.get('version')} is not {MIXTURE_STATE_VERSION}")
        saved = state["sources"]
        if len(saved) != len(self.streams):
            raise DataError(
                f"loader state has {len(saved)} sources but the data now has {len(self.streams)}: "
                f"resume with the same data.sources"
            )
        dirs, now = [s["dir"] for s in saved], [s.files[0].parent.name for s in self.streams]
        if dirs != now:
            raise DataError(
                f"loader state was saved on source directories {dirs}, now {now}: the sources "
                f"changed (or their order), so the stream cannot be resumed exactly"
            )
        weights = [float(s["weight"]) for s in saved]
        if weights != self.weights:
            raise DataError(
                f"loader state was saved with source weights {weights}, now {self.weights}: "
                f"the mixture changed, so the stream cannot be resumed exactly"
            )

    def continue_after(self, states: Sequence[dict]) -> None:
        """Pick up the streams of a run on another number of ranks: every source continues after
        the furthest row group any old rank had read in it (`DocumentStream.continue_after`), and
        each source's token count is the old ranks' total shared evenly, so the weights keep
        balancing from where they were. Packing buffers are not carried over."""
        for state in states:
            self._check_sources(state)
        for i, stream in enumerate(self.streams):
            stream.continue_after([state["sources"][i] for state in states])
            self.tokens_drawn[i] = sum(int(st["sources"][i]["tokens_drawn"]) for st in states) // self.world_size
            self.docs_drawn[i] = sum(int(st["sources"][i]["docs_drawn"]) for st in states) // self.world_size

    def load_state_dict(self, state: dict) -> None:
        self._check_sources(state)
        self._check_rank(state)
        saved = state["sources"]
        for stream, s in zip(self.streams, saved):
            stream.load_state_dict(s)
        self.tokens_drawn = [int(s["tokens_drawn"]) for s in saved]
        self.docs_drawn = [int(s["docs_drawn"]) for s in saved]
        self.packer.load_state_dict(state["packer"])
        self._load_pending(state.get("pending_rows"))

    @property
    def stats(self) -> dict:
        total = sum(self.tokens_drawn) or 1
        return {
            "epoch": max(s.epoch for s in self.streams),
            "row_groups_read": sum(s.row_groups_read for s in self.streams),
            "sources": [
                {
                    "epoch": s.epoch,
                    "row_groups_read": s.row_groups_read,
                    "tokens_drawn": t,
                    "docs_drawn": d,
                    "token_share": t / total,
                    "weight_share": w / sum(self.weights),
                }
                for s, t, d, w in zip(self.streams, self.tokens_drawn, self.docs_drawn, self.weights)
            ],
            **self.packer.stats(),
        }


def make_loader(
    shard_sets: Sequence[tuple[Sequence[Path], float]], tokenizer: Any, batch_size: int, seq_len: int, **kw: Any
) -> PretrainLoader | MixtureLoader:
    """A `PretrainLoader` for one `(files, weight)` shard set (the weight is then irrelevant), a
    `MixtureLoader` for several. `kw`: rank, world_size, device, buffer_size, threads, infinite,
    pad_last, state."""
    if not shard_sets:
        raise DataError("make_loader got no shard sets")
    if len(shard_sets) == 1:
        return PretrainLoader(shard_sets[0][0], tokenizer, batch_size, seq_len, **kw)
    return MixtureLoader(shard_sets, tokenizer, batch_size, seq_len, **kw)


def rank_loader(
    shard_sets: Sequence[tuple[Sequence[Path], float]],
    tokenizer: Any,
    batch_size: int,
    seq_len: int,
    ctx: Any,
    data: Any,
    **kw: Any,
) -> PretrainLoader | MixtureLoader:
    """`make_loader` for one rank (`ctx`: its rank, world size and device) with the data group's
    document buffer and tokenizer threads (`data`: a DataConfig). `kw`: infinite, pad_last, state."""
    return make_loader(
        shard_sets,
        tokenizer,
        batch_size,
        seq_len,
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=ctx.device,
        buffer_size=data.doc_buffer,
        threads=data.tokenizer_threads,
        **kw,
    )


def train_sets(shard_dirs: Sequence[Path], data: Any) -> list[tuple[list[Path], float]]:
    """(train shard files, weight) of every source: each directory's shards but the last (validation)."""
    from chatlm.data.shards import list_shards

    return [(list_shards(d)[0], s.weight) for d, s in zip(shard_dirs, data.sources)]


def val_sets(shard_dirs: Sequence[Path], data: Any) -> list[tuple[Path, float]]:
    """(validation shard, weight) of every source: each directory's last shard."""
    from chatlm.data.shards import list_shards

    return [(list_shards(d)[1], s.weight) for d, s in zip(shard_dirs, data.sources)]
