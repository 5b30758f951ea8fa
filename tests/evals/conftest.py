"""Shared pieces of the evaluation tests: a small real tokenizer, a tiny real GPT, the fixture
task files, and table models that answer from a list of correct sequences (an oracle) or have no
preference at all (uniform)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatlm.config import ModelConfig, TokenizerConfig
from chatlm.model import GPT
from chatlm.tokenizer import train_tokenizer
from tests.tokenizer.conftest import make_corpus

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "evals"


class TableModel(torch.nn.Module):
    """Logits that put `confidence` on the next token of any known sequence whose prefix the
    position has read, and 0 everywhere else. With no sequences it is the uniform model."""

    def __init__(self, vocab_size: int, sequences=(), confidence: float = 30.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorers a device
        self.vocab_size, self.confidence = vocab_size, confidence
        self.table: dict[tuple[int, ...], int] = {}
        for seq in sequences:
            for t in range(1, len(seq)):
                self.table[tuple(seq[:t])] = seq[t]
        self.forwards = 0

    def forward(self, idx: torch.Tensor, targets=None, kv_cache=None) -> torch.Tensor:
        self.forwards += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                nxt = self.table.get(tuple(row[: t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = self.confidence
        return logits


def make_tok():
    return train_tokenizer(make_corpus(), TokenizerConfig(name="evals512", vocab_size=512))


@pytest.fixture(scope="session")
def tok():
    return make_tok()


@pytest.fixture(scope="session")
def gpt(tok):
    return make_gpt(tok)


def make_gpt(tok):
    """A tiny GPT off its init point (so losses differ), fp32 on CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", depth=2, aspect_ratio=32, head_dim=32, sequence_len=256, window_round=32)
    with torch.device("meta"):
        model = GPT(cfg, tok.vocab_size, torch.float32, "sdpa")
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()
