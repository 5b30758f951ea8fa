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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from chatlm.data.packing import BestFitPacker
from chatlm.data.shards import DataError, iter_row_groups

STATE_VERSION = 1


class PretrainLoader:
    """Batches of (inputs, targets), each (B, T) int64 on `device`.

    The returned tensors live in one of two alternating buffers: a batch stays valid while the next
    one is produced, and is overwritten by the one after. Clone it to keep it longer.
    """

    def __init__(self, files: Sequence[Path], tokenizer: Any, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", buffer_size: int = 1000,
                 threads: int = 4, infinite: bool = True, state: Optional[dict] = None):
        if not files:
            raise DataError("the loader got no shard files")
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.B, self.T = int(batch_size), int(seq_len)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.threads = threads
        self.infinite = infinite
        self.packer = BestFitPacker(bos_id=tokenizer.bos_id, buffer_size=buffer_size)
        self.position: Optional[tuple[int, int]] = None  # last (file, row group) consumed
        self._exhausted = False  # a finite loader has read everything
        self._pending: Optional[np.ndarray] = None  # rows to hand out before packing new ones (resume)
        self._last_rows: Optional[np.ndarray] = None
        self.epoch = 1
        self.row_groups_read = 0
        if state is not None:
            self.load_state_dict(state)
        self._row_groups: Optional[Iterator] = None
        # double-buffered host rows and device batches (see the class docstring)
        self._rows = [np.empty((self.B, self.T + 1), dtype=np.int32) for _ in range(2)]
        pin = self.device.type == "cuda"
        self._staging = [torch.empty(2 * self.B * self.T, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._on_device = ([torch.empty(2 * self.B * self.T, dtype=torch.int64, device=self.device) for _ in range(2)]
                           if pin else self._staging)
        self._copied = [None, None]  # CUDA events: staging k may be rewritten once its copy is done
        self._slot = 0

    # -- reading -------------------------------------------------------------------------------

    def _documents(self) -> Optional[list[list[int]]]:
        """The next row group of this rank, tokenized (the packer's refill); None when a finite
        loader has read everything (the packer then empties its buffer)."""
        if self._exhausted:
            return None
        while True:
            if self._row_groups is None:
                self._row_groups = iter_row_groups(self.files, self.rank, self.world_size, start=self.position)
            try:
                texts, pos = next(self._row_groups)
            except StopIteration:
                if self.position is None:
                    raise DataError(f"rank {self.rank} of {self.world_size} has no row groups to read in "
                                    f"{len(self.files)} shard(s): use fewer ranks or more data") from None
                if not self.infinite:
                    self._exhausted = True
                    return None
                self.epoch += 1
                self.position = None
                self._row_groups = None
                continue
            self.position = pos
            self.row_groups_read += 1
            return self.tokenizer.encode(texts, prepend=self.tokenizer.bos_id, num_threads=self.threads)

    def next_rows(self) -> np.ndarray:
        """The next (B, T+1) block of packed rows (host memory)."""
        rows = self._rows[self._slot]
        if self._pending is not None:
            rows[:] = self._pending
            self._pending = None
            self._last_rows = rows
            return rows
        for b in range(self.B):
            try:
                self.packer.pack_row(self.T + 1, refill=self._documents, out=rows[b])
            except RuntimeError:
                if not self._exhausted:
                    raise
                raise StopIteration from None  # a finite loader ran out: the partial batch is dropped
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

    # -- resuming ------------------------------------------------------------------------------

    def state_dict(self, include_last_batch: bool = False) -> dict:
        """Where the stream is. With `include_last_batch` the most recent batch is stored too and is
        handed out again first after loading: a training loop that prefetches its next batch saves
        the state as of *before* that prefetch, so a resumed run sees that batch."""
        pending = self._pending
        if include_last_batch and self._last_rows is not None:
            pending = self._last_rows
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "files": [f.name for f in self.files], "position": self.position, "epoch": self.epoch,
                "row_groups_read": self.row_groups_read, "packer": self.packer.state_dict(),
                "pending_rows": None if pending is None else pending.copy()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise DataError(f"loader state is for rank {state['rank']} of {state['world_size']}, "
                            f"not rank {self.rank} of {self.world_size}")
        names = [f.name for f in self.files]
        if state["files"] != names:
            raise DataError(f"loader state was saved on shards {state['files'][:3]}... but the data now has "
                            f"{names[:3]}...: the shard set changed, so the stream cannot be resumed exactly")
        self.position = tuple(state["position"]) if state["position"] is not None else None
        self.epoch = int(state["epoch"])
        self.row_groups_read = int(state["row_groups_read"])
        self.packer.load_state_dict(state["packer"])
        pending = state.get("pending_rows")
        self._pending = None if pending is None else np.asarray(pending, dtype=np.int32).reshape(self.B, self.T + 1)
        self._row_groups = None

    @property
    def stats(self) -> dict:
        return {"epoch": self.epoch, "row_groups_read": self.row_groups_read, **self.packer.stats()}
