"""KV-cache generation against naive full-sequence decoding, sampling, stop tokens, text samples."""

from __future__ import annotations

import pytest
import torch

from chatlm.config import ModelConfig, TokenizerConfig
from chatlm.engine import SAMPLE_PROMPTS, generate, sample_texts
from chatlm.model import GPT

VOCAB = 100


def make_model(vocab: int = VOCAB, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    # sequence_len 64, window_round 32: layer 0 has a 32-token short window, so the decode
    # below (up to ~45 positions) runs past it; smear and backout are on.
    cfg = ModelConfig(name="tiny", depth=2, aspect_ratio=32, head_dim=32, sequence_len=64, window_round=32)
    with torch.device("meta"):
        model = GPT(cfg, vocab, torch.float32, "sdpa")
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the init point: zero projections, smear and backout all matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
    assert model.smear_gate is not None and model.blocks[0].attn.window == 32
    return model


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference: re-forward the whole sequence for every token, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


PROMPTS = [
    [1, 2, 3],
    [5] * 7 + [9, 4],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
    [42],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4],
]


def test_greedy_kv_cache_matches_naive_decoding():
    model = make_model()
    model.train()
    out = generate(model, PROMPTS, 24)
    assert model.training  # mode restored
    assert [len(o) for o in out] == [24] * len(PROMPTS)
    for prompt, got in zip(PROMPTS, out):
        assert got == naive_greedy(model, prompt, 24)
    # the outputs are not degenerate (the comparison means something)
    assert len({t for o in out for t in o}) > 5


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy():
    model = make_model()
    a = generate(model, PROMPTS, 12, temperature=1.0, seed=123)
    b = generate(model, PROMPTS, 12, temperature=1.0, seed=123)
    c = generate(model, PROMPTS, 12, temperature=1.0, seed=124)
    assert a == b and a != c
    assert generate(model, PROMPTS, 12, temperature=1.0, top_k=50, seed=7) == generate(
        model, PROMPTS, 12, temperature=1.0, top_k=50, seed=7
    )
    greedy = generate(model, PROMPTS, 12)
    assert generate(model, PROMPTS, 12, temperature=0.8, top_k=1, seed=5) == greedy
    assert generate(model, PROMPTS, 12, temperature=0.0, seed=999) == greedy  # greedy ignores the seed


def test_rows_sample_independently_and_top_k_restricts():
    model = make_model()
    prompt = [1, 2, 3, 4]
    rows = generate(model, [prompt] * 32, 1, temperature=1.0, top_k=3, seed=0)
    with torch.no_grad():
        top3 = set(torch.topk(model(torch.tensor([prompt]))[0, -1], 3).indices.tolist())
    firsts = {r[0] for r in rows}
    assert firsts <= top3 and len(firsts) > 1  # independent per row, never outside the top 3
    many = generate(model, [prompt] * 8, 10, temperature=1.5, seed=0)
    assert len({tuple(r) for r in many}) > 1


def test_stop_ids_end_each_row():
    model = make_model()
    full = generate(model, PROMPTS, 20)
    stop = full[0][3]
    assert stop not in full[0][:3]
    got = generate(model, PROMPTS, 20, stop_ids=[stop])
    for f, g in zip(full, got):
        expected = f[: f.index(stop)] if stop in f else f
        assert g == expected  # stop token excluded, later tokens dropped, other rows unaffected
    assert got[0] == full[0][:3]
    # sampling rows stop too
    sampled = generate(model, PROMPTS, 20, temperature=1.0, seed=3, stop_ids=range(0, VOCAB, 2))
    assert all(t % 2 == 1 for row in sampled for t in row)
    assert generate(model, PROMPTS, 0) == [[] for _ in PROMPTS]


def test_sample_texts_continue_after_the_prompt():
    from chatlm.tokenizer import train_tokenizer

    corpus = [
        "The capital of France is Paris. The opposite of hot is cold. " * 3,
        "My favorite color is blue, and the planets of the solar system are many.",
    ] * 20
    tok = train_tokenizer(corpus, TokenizerConfig(name="t300", vocab_size=300))
    model = make_model(vocab=tok.vocab_size)
    prompts = list(SAMPLE_PROMPTS[:3])
    texts = sample_texts(model, tok, prompts, max_new_tokens=8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    for p, t in zip(prompts, texts):
        ids = [tok.bos_id] + tok.encode(p)
        new = generate(model, [ids], 8, stop_ids=[tok.bos_id])[0]
        assert t == tok.decode(new)  # only the continuation, not the prompt
        assert tok.decode(ids[1:] + new) == p + t


def test_sample_prompts_are_nanochats():
    assert SAMPLE_PROMPTS == (
        "The capital of France is",
        "The chemical symbol of gold is",
        "If yesterday was Friday, then tomorrow will be",
        "The opposite of hot is",
        "The planets of the solar system are:",
        "My favorite color is",
        "If 5*x + 3 = 13, then x is",
    )


def test_rejects_empty_prompt():
    with pytest.raises(ValueError):
        generate(make_model(), [[1, 2], []], 3)
