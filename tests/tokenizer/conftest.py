"""A small real tokenizer, trained once per test session with rustbpe (well under a second)."""

from __future__ import annotations

import random

import pytest

from chatlm.config import TokenizerConfig
from chatlm.tokenizer import train_tokenizer

VOCAB_SIZE = 512

_WORDS = (
    "the of and to in is was for on that with as by at from his her they which this be are "
    "model token train data loss learning rate batch layer attention transformer python code "
    "number value function return print import class def while for if else chat user "
    "assistant system café naïve façade über straße Ελληνικά русский язык 日本語 中文 한국어"
).split()


def make_corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text: sentences of common words, numbers, code and some unicode."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ":"]))
        if i % 5 == 0:
            sentences.append(f"def f{i}(x):\n    return x * {rng.randint(0, 9999)}\n")
        if i % 7 == 0:
            sentences.append("漢字とかな 😀🎉 e\u0301te\u0301 \u05e9\u05dc\u05d5\u05dd \t\r\n")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def tok_cfg() -> TokenizerConfig:
    return TokenizerConfig(name="test512", vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tok(corpus, tok_cfg):
    return train_tokenizer(corpus, tok_cfg)
