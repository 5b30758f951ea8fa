"""A small real tokenizer (with the chat tokens) and a tiny GPT, built once for the RL unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def rl_tok():
    from tests.evals.conftest import make_tok

    return make_tok()


@pytest.fixture(scope="session")
def rl_gpt(rl_tok):
    from tests.evals.conftest import make_gpt

    return make_gpt(rl_tok)
