"""Batch streams a Trainer can take besides the data loaders: repeated batches (debug=overfit) and
random ids (the benchmark)."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class RepeatBatches:
    """`overfit_batches=N` (debug=overfit): the first N micro-batches, over and over. A model and
    optimizer that cannot drive the loss on them towards zero have a bug. Its position is the
    wrapped loader's."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n, self.i = loader, n, 0
        self.batches: list[Any] = []

    def next_batch(self) -> Any:
        if len(self.batches) < self.n:
            self.batches.append(self.loader.next_batch())
            return self.batches[-1]
        batch = self.batches[self.i % self.n]
        self.i += 1
        return batch

    def state_dict(self, **kwargs: Any) -> dict:
        return self.loader.state_dict(**kwargs)

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def continue_after(self, states: Sequence[dict]) -> None:
        self.loader.continue_after(states)


class SyntheticBatches:
    """(inputs, targets) of uniform random ids in [0, vocab): the benchmark's tokens without data."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, device: torch.device, seed: int):
        self.vocab_size, self.B, self.T, self.device = vocab_size, batch_size, seq_len, device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, self.vocab_size, (self.B, self.T + 1), device=self.device, generator=self.gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def state_dict(self, **kwargs: Any) -> dict:
        return {}
