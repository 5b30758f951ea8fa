"""SFT data: generated conversations, mixtures, rendering with loss masks, best-fit packing of whole
conversations, and the batches the trainer reads (exact targets, resume by cursor)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from chatlm.config.sft import ChatSourceConfig, MixtureConfig
from chatlm.data.chat import generated
from chatlm.data.chat.mixture import build_mixture, read_conversations
from chatlm.data.chat.rows import SFTBatches, cut_at_turn, plan_rows, render_all, row_arrays
from chatlm.data.shards import DataError
from chatlm.errors import ConfigError
from chatlm.tokenizer.chat_format import render_conversation
from tests.tokenizer.conftest import make_corpus


@pytest.fixture(scope="module")
def tok():
    from chatlm.config import TokenizerConfig
    from chatlm.tokenizer import train_tokenizer

    return train_tokenizer(make_corpus(), TokenizerConfig(name="sft512", vocab_size=512))


@pytest.fixture
def words_dir(tmp_path):
    """2,000 made-up lowercase words in <dir>/chat/words.txt (where the evals' word list lives)."""
    import random

    rng = random.Random(0)
    words = sorted(
        {"".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(3, 10))) for _ in range(2000)}
    )
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "words.txt").write_text("\n".join(words) + "\n")
    return str(tmp_path)


def mixture(**sources) -> MixtureConfig:
    return MixtureConfig(name="t", sources={k: ChatSourceConfig(**v) for k, v in sources.items()}, seed=7)


# ----------------------------------------------------------------------------------------------
# rendering and masks


def test_row_targets_are_exactly_the_assistant_tokens_including_tool_calls(tok):
    conv = generated.arithmetic(1, seed=3)[0]  # text, python call, forced python output, text
    ids, mask = render_conversation(tok, conv)
    special = {name: tok.encode_special(name) for name in tok.special_tokens}
    # walk the rendering: only assistant text, the python call with its delimiters and the
    # assistant_end are trained; BOS, user turns, assistant_start and the tool output are not
    expect, trained = [], False
    in_output = False
    for t in ids:
        if t == special["<|assistant_start|>"]:
            expect.append(0)
            trained = True
            continue
        if t == special["<|output_start|>"]:
            in_output = True
        if t in (special["<|bos|>"], special["<|user_start|>"]):
            trained = False
        expect.append(1 if trained and not in_output else 0)
        if t == special["<|output_end|>"]:
            in_output = False
        if t == special["<|assistant_end|>"]:
            trained = False
    assert mask == expect
    assert sum(mask) > 5 and mask.count(0) > 5
    r = render_all(tok, [conv], capacity=len(ids) + 10)
    inputs, targets = row_arrays(r, [0], len(ids) + 10, tok.bos_id)
    assert inputs[: len(ids)].tolist() == ids[: len(ids)]
    for i, target in enumerate(targets.tolist()):
        if i + 1 < len(ids) and mask[i + 1] == 1:
            assert target == ids[i + 1]
        else:
            assert target == -1  # context, tool output or padding
    assert (inputs[len(ids) :] == tok.bos_id).all()  # padded with BOS


def test_overlong_conversations_are_cut_at_a_turn_or_dropped_and_counted(tok):
    long = {"messages": []}
    for i in range(6):
        long["messages"] += [
            {"role": "user", "content": f"question number {i} about apples and bananas"},
            {"role": "assistant", "content": f"answer number {i}: the apples are red and the bananas yellow"},
        ]
    ids, mask = render_conversation(tok, long)
    cap = len(ids) // 2
    n = cut_at_turn(ids, mask, cap, tok.encode_special("<|assistant_end|>"))
    assert n is not None and n <= cap and ids[n - 1] == tok.encode_special("<|assistant_end|>")
    r = render_all(tok, [long, long], cap, "truncate")
    assert r.stats.truncated == 2 and r.stats.dropped == 0 and r.lengths.tolist() == [n, n]
    r = render_all(tok, [long], cap, "drop")
    assert r.stats.dropped == 1 and len(r) == 0
    first_turn = cut_at_turn(ids, mask, len(ids), tok.encode_special("<|assistant_end|>"))
    assert first_turn == len(ids)
    assert render_all(tok, [long], 8, "truncate").stats.dropped == 1  # not even one turn fits


# ----------------------------------------------------------------------------------------------
# packing


def test_plan_rows_packs_every_conversation_once_best_fit_never_cropped():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=500).tolist()
    rows = plan_rows(range(500), lengths, capacity=100, buffer_size=20)
    placed = [j for row in rows for j in row]
    assert sorted(placed) == list(range(500))
    assert all(sum(lengths[j] for j in row) <= 100 for row in rows)
    # best fit: within a row, each pick was the longest buffered one that fit, so the row's
    # lengths never increase after the first pick of a given room
    waste = sum(100 - sum(lengths[j] for j in row) for row in rows[:-1]) / (100 * (len(rows) - 1))
    assert waste < 0.05, waste  # a buffer of 20 fills rows almost completely
    with pytest.raises(ValueError, match="more than a row"):
        plan_rows([0], [101], 100, 4)


def test_batches_resume_exactly_and_wrap_epochs(tok):
    convs = generated.arithmetic(40, seed=1)
    r = render_all(tok, convs, 200)
    rows = plan_rows(range(len(r)), r.lengths, 200, 8)
    a = SFTBatches(r, rows, 2, 200, tok.bos_id, "cpu")
    seen = [a.next_batch() for _ in range(3)]
    state = a.state_dict()
    more = [a.next_batch() for _ in range(len(rows))]  # past the end: a new epoch starts
    assert a.epoch >= 1
    b = SFTBatches(r, rows, 2, 200, tok.bos_id, "cpu")
    b.load_state_dict(state)
    for x, y in zip(more, [b.next_batch() for _ in range(len(rows))]):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(seen[0][0], seen[1][0])
    other = SFTBatches(render_all(tok, convs[:-1], 200), rows[:-1], 2, 200, tok.bos_id, "cpu")
    # a resume onto other data, or from another stage's checkpoint, is one line (a ChatlmError)
    with pytest.raises(DataError, match="other conversations"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="not an SFT loader state .* init_from"):
        other.load_state_dict({"kind": "rl", "step": 3, "index": 0})


# ----------------------------------------------------------------------------------------------
# generated sources and mixtures


def test_generated_sources_are_seeded_and_well_formed(tok, words_dir):
    from chatlm.data.chat.mixture import source_conversations
    from chatlm.tokenizer.chat_format import conversation_problem

    cfg = mixture(identity={"kind": "identity", "size": 30}, spelling={"kind": "spelling", "size": 30})
    for name, source in cfg.sources.items():
        one, _ = source_conversations(name, source, cfg, words_dir)
        two, _ = source_conversations(name, source, cfg, words_dir)
        assert one == two and len(one) == 30
        assert all(conversation_problem(c) is None for c in one)
    # conversation i does not depend on how many are generated
    assert generated.arithmetic(5, 2) == generated.arithmetic(9, 2)[:5]
    assert generated.arithmetic(5, 2) != generated.arithmetic(5, 3)
    # arithmetic answers are right: the forced tool output equals the expression's value
    for conv in generated.arithmetic(50, 0):
        parts = conv["messages"][1]["content"]
        expr, out = parts[1]["text"], parts[2]["text"]
        assert str(eval(expr, {"__builtins__": {}})) == out  # noqa: S307 - our own generated arithmetic
        assert parts[3]["text"].endswith(f"#### {out}")


def test_spelling_never_uses_spelling_bee_eval_words(words_dir):
    from chatlm.evals.chat import load_words, spelling_bee_items

    words = load_words(words_dir)
    held = {item["word"] for item in spelling_bee_items(words)}
    convs = generated.spelling(400, 0, words)
    used = {c["messages"][0]["content"].split("'")[-2] if "'" in c["messages"][0]["content"] else "" for c in convs}
    assert held and not (held & used)


def test_identity_reads_the_users_yaml(tmp_path):
    p = tmp_path / "me.yaml"
    facts = "facts:\n  - questions: ['Who are you?']\n    answers: ['I am {name} by {maker}.']\n"
    p.write_text("name: Zed\nmaker: Acme Labs\n" + facts)
    (conv,) = generated.identity(1, 0, str(p))
    assert conv["messages"][-1]["content"] == "I am Zed by Acme Labs."
    p.write_text("name: Zed\nfacts: [Who are you?]\n")
    with pytest.raises(DataError, match=r"not YAML \(line 2: expected ',' or ']'"):
        generated.identity(1, 0, str(p))
    p.write_text("name: Zed\n")
    with pytest.raises(DataError, match="needs string fields 'name' and 'maker'|facts"):
        generated.identity(1, 0, str(p))
    for answer, why in [("I am {name}, {age} years old.", "'age'"), ("I like {curly braces", "expected '}'")]:
        p.write_text(f"name: Zed\nmaker: Acme\nfacts:\n  - questions: ['Who are you?']\n    answers: [{answer!r}]\n")
        with pytest.raises(DataError, match=rf"{p}: facts\[0\]\.answers\[0\].*{{name}} and {{maker}}.*{why}"):
            generated.identity(1, 0, str(p))


def test_mixture_is_deterministic_holds_out_and_repeats_by_epochs(words_dir):
    cfg = mixture(
        identity={"kind": "identity", "size": 100, "epochs": 2.0},
        arithmetic={"kind": "arithmetic", "size": 100, "epochs": 0.5},
    )
    cfg.val_fraction = 0.1
    a, b = build_mixture(cfg, words_dir), build_mixture(cfg, words_dir)
    assert a.train == b.train and a.val == b.val
    reports = {r.name: r for r in a.reports}
    # identity repeats its templates: the 8 conversations equal to a held-out one are left out too
    assert reports["identity"].val == 10 and reports["identity"].train == 2 * (90 - 8)
    assert reports["arithmetic"].train == 45
    assert len(a.train) == 164 + 45 and len(a.val) == 20
    held = {json.dumps(c, sort_keys=True) for c in a.val if c in generated.arithmetic(100, cfg.seed)}
    trained = {json.dumps(c, sort_keys=True) for c in a.train}
    assert held and not (held & trained)  # held-out arithmetic problems are never trained on
    cfg.seed = 8
    assert build_mixture(cfg, words_dir).train != a.train


def test_held_out_conversations_are_never_trained_on_even_where_they_recur(words_dir, tmp_path):
    # identity draws from a few templates (repeats), and one file may feed two sources
    convs = [
        {"messages": [{"role": "user", "content": f"q{i % 7}"}, {"role": "assistant", "content": f"a{i % 7}"}]}
        for i in range(40)
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    cfg = mixture(
        identity={"kind": "identity", "size": 200, "epochs": 2.0},
        arithmetic={"kind": "arithmetic", "size": 100, "epochs": 0.5},
        mine={"kind": "jsonl", "path": str(path), "epochs": 1.5},
        again={"kind": "jsonl", "path": str(path)},
    )
    cfg.val_fraction = 0.1
    m = build_mixture(cfg, words_dir)
    key = lambda c: json.dumps(c["messages"], sort_keys=True)  # noqa: E731
    held = [key(c) for c in m.val]
    assert len(held) == len(set(held)) == sum(r.val for r in m.reports) > 0
    assert not set(held) & {key(c) for c in m.train}
    assert {r.name: r.val for r in m.reports}["identity"] == 20 and m.train  # still trains on the rest


def test_mixture_refuses_eval_only_splits(words_dir, tmp_path):
    for name, source in [
        ("gsm8k", {"kind": "arithmetic"}),
        ("mine", {"kind": "jsonl", "path": str(tmp_path / "evals" / "chat" / "mmlu.jsonl")}),
        ("core", {"kind": "jsonl", "path": "/x/core/eval_data/reading/squad.jsonl"}),
    ]:
        with pytest.raises(ConfigError, match="never training sources") as e:
            build_mixture(mixture(**{name: source}), words_dir)
        assert e.value.key.startswith("mixture.sources.")


def test_malformed_records_are_named_and_the_rest_kept(tmp_path, caplog):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps(good),
    ]
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    convs, bad = read_conversations(p)
    assert len(convs) == 2 and bad == 3
    text = caplog.text
    assert f"{p}:2:" in text and f"{p}:3:" in text and f"{p}:4:" in text and "assistant" in text
    p.write_text("{bad\n")
    with pytest.raises(DataError, match="no usable conversations"):
        read_conversations(p)


def test_mixture_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="epochs"):
        mixture(a={"kind": "identity", "epochs": 0.0})
    with pytest.raises(ConfigError, match="kind"):
        mixture(a={"kind": "smoltalkk"})
    with pytest.raises(ConfigError, match="path"):
        mixture(a={"kind": "jsonl"})
    with pytest.raises(ConfigError, match="val_fraction"):
        MixtureConfig(sources={}, val_fraction=1.0)


def test_missing_fetched_source_names_the_command(tmp_path, words_dir):
    cfg = mixture(chatterbot={"kind": "chatterbot"})
    cfg.data_dir = str(tmp_path / "nothing")
    with pytest.raises(DataError, match="chatlm fetch sft --sources chatterbot"):
        build_mixture(cfg, words_dir)


def test_sft_validation_scores_at_most_eval_tokens(tok, monkeypatch):
    """nanochat scores eval_tokens // (B x T x ranks) batches of the held-out rows; a smaller
    held-out set is scored whole."""
    from types import SimpleNamespace

    import chatlm.evals.bpb
    from chatlm.training.sft import _val_bpb

    B, T = 2, 256
    val = render_all(tok, generated.arithmetic(60, seed=5), T + 1)
    assert len(val) == 60
    seen: list[int] = []
    monkeypatch.setattr(
        chatlm.evals.bpb,
        "evaluate_bpb",
        lambda model, batches, token_bytes, max_steps=None: seen.append(
            sum(1 for _ in itertools.islice(batches, max_steps))
        ),
    )
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    built = SimpleNamespace(model=torch.nn.Linear(1, 1), fp8_linears=0, train_model=None)
    plan = SimpleNamespace(seq_len=T, device_batch_size=B)
    whole = -(-len(plan_rows(range(len(val)), val.lengths, T + 1, 100)) // B)
    for eval_tokens, batches in [(3 * B * T, 3), (3 * B * T + 5, 3), (10**9, whole)]:
        cfg = SimpleNamespace(buffer_size=100, eval_tokens=eval_tokens)
        evaluate = _val_bpb(cfg, SimpleNamespace(ctx=ctx), SimpleNamespace(tokenizer=tok), built, plan, val)
        evaluate()
        assert seen[-1] == batches and whole > 3


def test_sft_plan_takes_the_largest_device_batch_that_divides_the_step():
    """The quickstart's base steps on 4,096 tokens of 256-token rows; hardware=auto's CPU preset asks for
    32 rows: SFT trains 16 rows at a time instead of refusing."""
    from types import SimpleNamespace

    from chatlm.training.sft import plan_sft

    base = SimpleNamespace(model=SimpleNamespace(sequence_len=256), meta={"plan": {"total_batch_size": 4096}})
    cfg = SimpleNamespace(hardware=SimpleNamespace(device_batch_size=32), total_batch_size=-1, steps=-1)
    stats = SimpleNamespace(conversations=10, trained_tokens=100, truncated=0, dropped=0)
    rendered = SimpleNamespace(stats=stats, lengths=np.array([200]))
    plan = plan_sft(cfg, base, rendered, [[[0]] * 100], rank=0)  # type: ignore[arg-type]
    assert (plan.device_batch_size, plan.grad_accum, plan.num_iterations) == (16, 1, 6)
    cfg.total_batch_size = 3 * 256 * 5
    plan = plan_sft(cfg, base, rendered, [[[0]] * 100], rank=0)  # type: ignore[arg-type]
    assert (plan.device_batch_size, plan.grad_accum) == (15, 1)
    cfg.total_batch_size = 1000
    with pytest.raises(ConfigError, match="not a multiple of sequence_len"):
        plan_sft(cfg, base, rendered, [[[0]] * 100], rank=0)  # type: ignore[arg-type]
