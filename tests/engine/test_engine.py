"""The engine against uncached decoding: ragged batches, joining and leaving, ring caches for
windowed layers, seeded sampling, stop tokens and strings, tool calls, cancellation, bad input."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from chatlm.engine import Engine, RequestError, SamplingParams
from chatlm.engine.kv_cache import SlotCache
from chatlm.engine.sampling import sample
from chatlm.engine.text import TextStream
from chatlm.engine.tools import ToolTokens
from tests.engine.test_generate import PROMPTS, VOCAB, make_model, naive_greedy


def run(engine: Engine, before=()) -> dict:
    """request id -> (tokens, finish reason, forced flags, text), from `before` and the rest of the stream."""
    out: dict = collections.defaultdict(lambda: ([], [], [], []))
    for ev in [*before, *engine.stream()]:
        tokens, reasons, forced, text = out[ev.request_id]
        if ev.token is not None:
            tokens.append(ev.token)
            forced.append(ev.forced)
        text.append(ev.text)
        if ev.finish_reason:
            reasons.append(ev.finish_reason)
    return {k: (v[0], v[1][0], v[2], "".join(v[3])) for k, v in out.items()}


def test_windowed_layers_keep_only_their_window():
    model = make_model()
    cache = SlotCache(model, slots=3, max_len=60)
    assert model.dims.windows == (32, 64)
    assert cache.lengths == (33, 60)  # layer 0 is a ring of window + 1 rows
    assert cache.k[0].shape == (3, model.dims.n_kv_head, 33, model.dims.head_dim)
    assert cache.k[1].shape[2] == 60 and cache.k[0].dtype == model.compute_dtype


def test_ragged_batch_equals_uncached_greedy_with_ring_and_smear():
    model = make_model()
    engine = Engine(model, max_batch=4, max_len=60)  # fewer slots than prompts: the 5th waits
    ids = [engine.add(p, SamplingParams(max_tokens=30)) for p in PROMPTS]
    done = run(engine)
    for rid, prompt in zip(ids, PROMPTS):
        tokens, reason, _, _ = done[rid]
        assert reason == "length" and tokens == naive_greedy(model, prompt, 30)
    # the 20-token prompts + 30 tokens run 18 positions past layer 0's 33-row ring
    assert max(map(len, PROMPTS)) + 30 > 33 + 10


def test_output_does_not_depend_on_batch_mates_or_join_time():
    model = make_model()
    alone = Engine(model, max_batch=1, max_len=64)
    rid = alone.add(PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.9, seed=11))
    ref = run(alone)[rid][0]

    busy = Engine(model, max_batch=6, max_len=64)
    others = [busy.add(p, SamplingParams(max_tokens=7 + i, temperature=1.0, seed=i)) for i, p in enumerate(PROMPTS)]
    early = [ev for _ in range(4) for ev in busy.step()]  # join after the others decoded a few steps
    late = busy.add(PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.9, seed=11))
    done = run(busy, early)
    assert done[late][0] == ref
    assert [len(done[o][0]) for o in others] == [7 + i for i in range(len(others))]
    greedy_alone = naive_greedy(model, PROMPTS[1], 15)
    mixed = Engine(model, max_batch=3, max_len=64)
    a = mixed.add(PROMPTS[1], SamplingParams(max_tokens=15))
    mixed.add(PROMPTS[0], SamplingParams(max_tokens=15, temperature=2.0, top_k=5, seed=3))
    assert run(mixed)[a][0] == greedy_alone  # a greedy row beside a filtered sampling row


def test_seeded_sampling_repeats_and_differs_by_seed():
    model = make_model()

    def sampled(seed, **kw):
        engine = Engine(model, max_batch=8, max_len=64)
        ids = [
            engine.add(p, SamplingParams(max_tokens=12, temperature=1.0, seed=seed + i, **kw))
            for i, p in enumerate(PROMPTS)
        ]
        done = run(engine)
        return [done[i][0] for i in ids]

    assert sampled(5) == sampled(5) and sampled(5) != sampled(6)
    assert sampled(5, top_p=0.5) == sampled(5, top_p=0.5)
    greedy = [naive_greedy(model, p, 12) for p in PROMPTS]
    assert sampled(9, top_k=1) == greedy and sampled(9, top_p=1e-6) == greedy


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution the sampler must draw from, written from the definition."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    q = p[kept] / p[kept].sum()
    chosen, mass = [], 0.0
    for tok, prob in zip(kept, q.tolist()):
        if mass >= top_p and chosen:
            break
        chosen.append(tok)
        mass += prob
    out = torch.zeros_like(p)
    out[chosen] = p[chosen] / p[chosen].sum()
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.6), (1.0, 5, 0.8)]
)
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.25])
    n = 20000
    rows = logits.expand(n, -1)

    def full(v, dtype):
        return torch.full((n,), v, dtype=dtype)

    seeds = torch.arange(n) * 7919 + 13  # one request per row, each at its first step
    tokens = sample(
        rows,
        full(temperature, torch.float32),
        full(top_k, torch.long),
        full(top_p, torch.float32),
        seeds,
        full(0, torch.long),
    )
    freq = torch.bincount(tokens, minlength=8).double() / n
    ref = _reference_probs(logits, temperature, top_k, top_p)
    assert freq[ref == 0].sum().item() == 0  # never outside the kept set
    sigma = (ref * (1 - ref) / n).sqrt()
    assert ((freq - ref).abs() <= 5 * sigma + 1e-9).all(), (freq, ref)
    # the same seed at successive steps gives fresh draws (not one token forever)
    steps = torch.arange(n)
    walk = sample(
        rows,
        full(temperature, torch.float32),
        full(top_k, torch.long),
        full(top_p, torch.float32),
        full(99, torch.long),
        steps,
    )
    assert (torch.bincount(walk, minlength=8).double() / n - ref).abs().max().item() < 0.02


def test_greedy_rows_take_argmax_whatever_the_seed():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(6)
    out = sample(logits, z, torch.zeros(6, dtype=torch.long), torch.ones(6), torch.arange(6), torch.arange(6))
    assert out.tolist() == logits.argmax(-1).tolist()


def test_stop_tokens_and_max_tokens_capped_by_context():
    model = make_model()
    full = naive_greedy(model, PROMPTS[0], 20)
    stop = full[5]
    engine = Engine(model, max_batch=2, max_len=16)
    a = engine.add(PROMPTS[0], SamplingParams(max_tokens=20, stop_token_ids=(stop,)))
    b = engine.add(PROMPTS[1], SamplingParams(max_tokens=100))  # 9 prompt tokens: room for 7
    done = run(engine)
    cut = full.index(stop)
    assert done[a][:2] == (full[:cut], "stop")
    assert done[b][:2] == (naive_greedy(model, PROMPTS[1], 7), "length")


@pytest.fixture(scope="module")
def tok():
    from tests.evals.conftest import make_tok

    return make_tok()


def test_text_stream_withholds_partial_characters_and_stop_prefixes(tok):
    ids = tok.encode("ab café 日本語 zz")
    stream = TextStream(tok)
    pieces = [stream.push(t)[0] for t in ids]
    assert "".join(pieces) + stream.flush() == "ab café 日本語 zz"
    assert all("\ufffd" not in p for p in pieces)
    s = TextStream(tok, stop=("END",))
    shown = []
    for t in tok.encode("the model EN"):
        shown.append(s.push(t))
    assert "".join(p for p, _ in shown) == "the model "  # "EN" may start "END": held back
    text, hit = s.push(tok.encode("D and more")[0])
    assert hit and s.text == "the model " and text == ""
    s2 = TextStream(tok, stop=("END",))
    for t in tok.encode("the ENzyme"):
        s2.push(t)
    assert s2.flush() == "" and s2.text == "the ENzyme"  # released when it turned out not to be a stop


def test_stop_strings_cut_exactly(tok):
    from tests.evals.conftest import make_gpt

    model = make_gpt(tok)
    prompt = [tok.bos_id] + tok.encode("The model")
    free = Engine(model, tok, max_batch=1, max_len=80)
    rid = free.add(prompt, SamplingParams(max_tokens=40))
    text = run(free)[rid][3]
    assert len(text) > 12
    stop = text[5:8]  # three characters from the middle
    engine = Engine(model, tok, max_batch=2, max_len=80)
    rid = engine.add(prompt, SamplingParams(max_tokens=40, stop=(stop, "never-seen")))
    tokens, reason, _, streamed = run(engine)[rid]
    assert reason == "stop" and streamed == text[: text.index(stop)]


def _train_on(model, sequences, steps=150):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.tensor(sequences)
    model.train()
    for _ in range(steps):
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_tool_calls_are_executed_and_fed_back(tok):
    from tests.evals.conftest import make_gpt

    tools = ToolTokens(tok)
    body = tok.encode("so")
    call = [tools.python_start, *tok.encode("6*7"), tools.python_end]
    wrong = [tools.output_start, *tok.encode("41"), tools.output_end]  # what it memorized
    seq = [tok.bos_id, *body, *call, *wrong, *tok.encode(" done")]
    torch.manual_seed(0)
    model = _train_on(make_gpt(tok), [seq])
    prompt = seq[: 1 + len(body)]
    plain = Engine(model, tok, max_batch=1, max_len=64)
    rid = plain.add(prompt, SamplingParams(max_tokens=len(seq) - len(prompt)))
    assert run(plain)[rid][0] == seq[len(prompt) :]  # without tools it recites the wrong output

    engine = Engine(model, tok, max_batch=2, max_len=64, tools=tools)
    rid = engine.add(prompt, SamplingParams(max_tokens=len(seq) - len(prompt) + 2))
    other = engine.add(PROMPTS[3], SamplingParams(max_tokens=8))
    done = run(engine)
    tokens, _, forced, text = done[rid]
    assert done[other][0] == naive_greedy(model, PROMPTS[3], 8)
    right = [tools.output_start, *tok.encode("42"), tools.output_end]
    at = len(call)
    assert tokens[:at] == call and tokens[at : at + len(right)] == right
    assert forced[at : at + len(right)] == [True] * len(right) and not any(forced[:at])
    assert "42" in text
    # every sampled token after the forced output continues the sequence that holds it
    full = prompt + tokens
    with torch.no_grad():
        logits = model(torch.tensor([full]))[0]
    for i in range(len(prompt), len(full)):
        if not forced[i - len(prompt)]:
            assert full[i] == int(logits[i - 1].argmax())


def test_cancel_frees_the_slot():
    model = make_model()
    engine = Engine(model, max_batch=1, max_len=64)
    a = engine.add(PROMPTS[0], SamplingParams(max_tokens=40))
    b = engine.add(PROMPTS[1], SamplingParams(max_tokens=5))
    for _ in range(3):
        engine.step()
    assert engine.running == 1 and engine.waiting == 1
    assert engine.cancel(a) and not engine.cancel(a) and not engine.cancel("nobody")
    done = run(engine)
    assert done[a][1] == "cancelled"
    assert done[b][:2] == (naive_greedy(model, PROMPTS[1], 5), "length")
    assert engine.running == 0 and not engine.has_work()
    w = Engine(model, max_batch=1, max_len=64)
    w.add(PROMPTS[0], SamplingParams(max_tokens=3))
    queued = w.add(PROMPTS[1], SamplingParams(max_tokens=3))
    assert w.cancel(queued) and run(w)[queued][1] == "cancelled"


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ([], SamplingParams(), "prompt"),
        ([1] * 64, SamplingParams(), "prompt"),
        ([1, VOCAB], SamplingParams(), "prompt"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
        ([1, 2], SamplingParams(temperature=math.nan), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 2], SamplingParams(top_k=-1), "top_k"),
        ([1, 2], SamplingParams(stop=("x",)), "stop"),
    ],
)
def test_bad_requests_are_refused_and_others_continue(prompt, params, field):
    model = make_model()
    engine = Engine(model, max_batch=2, max_len=64)
    good = engine.add(PROMPTS[0], SamplingParams(max_tokens=6))
    first = engine.step()
    with pytest.raises(RequestError) as err:
        engine.add(prompt, params)
    assert err.value.field == field and str(err.value).startswith(field + ":")
    assert run(engine, first)[good][0] == naive_greedy(model, PROMPTS[0], 6)


def test_generate_collects_completions_in_order(tok):
    from tests.evals.conftest import make_gpt

    model = make_gpt(tok)
    engine = Engine(model, tok, max_batch=2, max_len=40)
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("the model", "python code is", "a")]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert [o.prompt_tokens for o in outs] == [len(p) for p in prompts]
    for o, p in zip(outs, prompts):
        assert o.tokens == naive_greedy(model, p, 6) and o.text == tok.decode(o.tokens) and o.finish_reason == "length"


def test_cast_for_inference_fuses_qkv_without_changing_logits():
    from chatlm.engine.engine import cast_for_inference

    model = make_model()
    idx = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        before = model(idx)
    cast_for_inference(model)
    attn = model.blocks[0].attn
    fused = attn.qkv_weight
    assert fused is not None and fused.shape[0] == attn.c_q.out_features + 2 * attn.c_k.out_features
    # the three weights are views of the fused tensor: one storage, no copy per call
    assert attn.c_k.weight.data_ptr() == fused[attn.c_q.out_features].data_ptr()
    with torch.no_grad():
        assert torch.equal(model(idx), before)
        x = torch.randn(1, 3, model.dims.n_embd)
        ref = torch.cat([attn.c_q(x), attn.c_k(x), attn.c_v(x)], dim=-1)
        torch.testing.assert_close(attn.qkv_matmul(x), ref)
