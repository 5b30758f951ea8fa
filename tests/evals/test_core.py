"""CORE: the bundle reader, prompts, spans, scoring against an oracle and a uniform model, batch
invariance, one multiple-choice item scored by hand, centring, and bad data."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from chatlm.data.shards import DataError
from chatlm.evals import core
from chatlm.evals.errors import EvalDataMissing
from chatlm.evals.scoring import Row, batches, crop, score_rows
from tests.evals.conftest import FIXTURES, TableModel

BUNDLE = FIXTURES / "core"


def prepared():
    return core.prepare_core(BUNDLE)


def gold_sequences(tok, prepared_tasks, max_examples=-1):
    """The token sequence of every example's right answer, as the scorer builds it."""
    out = []
    for task, examples in prepared_tasks:
        data = core.select(examples, max_examples)
        for i, item in enumerate(data):
            prompts = core.render_prompts(task.kind, item, task.delimiter, core.fewshot(data, i, task.num_fewshot))
            ids = tok.encode(prompts, prepend=tok.bos_id)
            out.append(ids[1] if task.kind == "language_modeling" else ids[int(item["gold"])])
    return out


def test_bundle_reader():
    tasks = core.read_bundle(BUNDLE)
    assert [(t.label, t.kind, t.num_fewshot, t.delimiter, t.baseline) for t in tasks] == [
        ("arc_easy", "multiple_choice", 2, "\nAnswer: ", 0.25),
        ("winogrande", "schema", 0, " ", 0.5),
        ("lambada_openai", "language_modeling", 1, " ", 0.0),
    ]


def test_prompts_match_nanochat_templates():
    item = {"query": "Q2", "choices": ["a", "b"], "gold": 1}
    shots = [{"query": "Q1", "choices": ["x", "y"], "gold": 0}]
    assert core.render_prompts("multiple_choice", item, ": ", shots) == ["Q1: x\n\nQ2: a", "Q1: x\n\nQ2: b"]
    item = {"context_options": ["A is", "B is"], "continuation": "here", "gold": 0}
    assert core.render_prompts("schema", item, " ", []) == ["A is here", "B is here"]
    item = {"context": "The end of the  ", "continuation": "road"}
    shots = [{"context": " One two ", "continuation": "three"}]
    assert core.render_prompts("language_modeling", item, " ", shots) == [
        "One two three\n\nThe end of the",
        "One two three\n\nThe end of the road",
    ]


def test_fewshot_draws_are_nanochats():
    data = [{"i": i} for i in range(10)]
    assert core.fewshot(data, 3, 4) == [data[i] for i in random.Random(1237).sample([0, 1, 2, 4, 5, 6, 7, 8, 9], 4)]
    assert data[3] not in core.fewshot(data, 3, 9)
    shuffled = list(range(10))
    random.Random(1337).shuffle(shuffled)
    assert [d["i"] for d in core.select(data, 4)] == shuffled[:4]


def test_spans(tok):
    # multiple choice: the span starts where the prompts stop sharing tokens
    rows = core.example_rows("multiple_choice", [[1, 5, 6, 7], [1, 5, 6, 9, 9]])
    assert [(r.start, r.end) for r in rows] == [(3, 4), (3, 5)]
    # schema: the common suffix
    rows = core.example_rows("schema", [[1, 4, 8, 9], [1, 5, 5, 8, 9]])
    assert [(r.start, r.end) for r in rows] == [(2, 4), (3, 5)]
    # language modelling: the continuation after the stripped context
    rows = core.example_rows("language_modeling", [[1, 2, 3], [1, 2, 3, 4, 5]])
    assert [(r.tokens, r.start, r.end) for r in rows] == [([1, 2, 3, 4, 5], 3, 5)]


def test_oracle_scores_everything(tok):
    tasks = prepared()
    oracle = TableModel(tok.vocab_size, gold_sequences(tok, tasks))
    summary, results = core.evaluate_core(oracle, tok, tasks, batch_size=4)
    assert {r.label: r.accuracy for r in results} == {"arc_easy": 1.0, "winogrande": 1.0, "lambada_openai": 1.0}
    assert summary["core_partial"] == 1.0 and "core" not in summary
    assert summary["core_tasks"] == ["arc_easy", "winogrande", "lambada_openai"]
    assert len(summary["core_missing"]) == 19 and "hellaswag" in summary["core_missing"]


def test_uniform_model_scores_the_random_baseline(tok):
    summary, results = core.evaluate_core(TableModel(tok.vocab_size), tok, prepared())
    assert {r.label: r.accuracy for r in results} == {"arc_easy": 0.25, "winogrande": 0.5, "lambada_openai": 0.0}
    assert all(r.centered == 0.0 for r in results) and summary["core_partial"] == 0.0


def test_centring_and_core_on_fixed_numbers():
    assert core.centered(0.25, 0.25) == 0.0 and core.centered(1.0, 0.62) == 1.0
    assert core.centered(0.5, 0.25) == pytest.approx(1 / 3)
    results = [core.TaskResult(label, 0, c, 1) for label, c in zip(core.CORE_LABELS, [0.1, 0.3] * 11)]
    assert core.core_summary(results)["core"] == pytest.approx(0.2)
    assert core.core_summary(results[:21])["core_partial"] == pytest.approx((0.1 * 11 + 0.3 * 10) / 21)
    assert core.tie_credit([1.0, 0.5, 0.5], 1) == 0.5 and core.tie_credit([1.0, 0.5, 0.5], 0) == 0.0


def test_one_multiple_choice_item_by_hand(tok, gpt):
    """nanochat's scoring of one item, computed here without the library's batching or spans."""
    task, examples = prepared()[0]
    data = core.select(examples, -1)
    item, shots = data[0], core.fewshot(data, 0, task.num_fewshot)
    head = "".join(f"{s['query']}\nAnswer: {s['choices'][s['gold']]}\n\n" for s in shots)
    prompts = [tok.encode(head + item["query"] + "\nAnswer: " + c, prepend=tok.bos_id) for c in item["choices"]]
    start = 0  # the choices' tokens begin where the prompts stop agreeing
    while all(len(p) > start for p in prompts) and len({p[start] for p in prompts}) == 1:
        start += 1
    mean_losses = []
    for ids in prompts:
        with torch.no_grad():
            logits = gpt(torch.tensor([ids]))[0]
        # logits at position t predict token t + 1
        mean_losses.append(F.cross_entropy(logits[start - 1 : len(ids) - 1], torch.tensor(ids[start:])).item())
    expected = 1.0 if mean_losses.index(min(mean_losses)) == item["gold"] else 0.0
    result = core.evaluate_task(gpt, tok, task, examples, max_examples=1)
    assert result.per_example == [expected]
    scores = score_rows(
        gpt,
        core.example_rows(
            task.kind, tok.encode(core.render_prompts(task.kind, item, task.delimiter, shots), prepend=tok.bos_id)
        ),
        tok.bos_id,
    )
    assert [s.mean_loss for s in scores] == pytest.approx(mean_losses, abs=1e-5)


def test_scores_do_not_depend_on_batch_size_or_padding(tok, gpt):
    tasks = prepared()
    per_batch = {}
    for batch_size in (1, 3, 8):
        rows_scores = []
        for task, examples in tasks:
            result = core.evaluate_task(gpt, tok, task, examples, batch_size=batch_size)
            rows_scores.append(result.per_example)
        per_batch[batch_size] = rows_scores
    assert per_batch[1] == per_batch[3] == per_batch[8]
    # the losses themselves, not only the decisions: rows padded to different lengths
    task, examples = tasks[0]
    data = core.select(examples, -1)
    rows = []
    for i, item in enumerate(data):
        prompts = core.render_prompts(task.kind, item, task.delimiter, core.fewshot(data, i, task.num_fewshot))
        rows += core.example_rows(task.kind, tok.encode(prompts, prepend=tok.bos_id))
    alone = score_rows(gpt, rows, tok.bos_id, batch_size=1)
    for batch_size in (3, 8, 64):
        together = score_rows(gpt, rows, tok.bos_id, batch_size=batch_size)
        assert [s.greedy_match for s in together] == [s.greedy_match for s in alone]
        assert [s.mean_loss for s in together] == pytest.approx([s.mean_loss for s in alone], abs=1e-5, rel=0)


def test_many_examples_share_a_forward_pass(tok):
    tasks = prepared()[:1]
    model = TableModel(tok.vocab_size)
    core.evaluate_core(model, tok, tasks, batch_size=32)
    assert model.forwards == 1  # 7 examples x 4 choices in one batch
    model = TableModel(tok.vocab_size)
    core.evaluate_core(model, tok, tasks, batch_size=32, max_batch_tokens=400)
    assert 1 < model.forwards <= 28


def test_batching_and_cropping_helpers():
    assert batches([5, 9, 7, 9], batch_size=2, max_batch_tokens=100) == [[1, 3], [2, 0]]
    assert batches([5, 9, 7], batch_size=8, max_batch_tokens=18) == [[1, 2], [0]]
    assert batches([50], batch_size=8, max_batch_tokens=10) == [[0]]
    row, cut = crop(Row(list(range(10)), 6, 10), 4)
    assert cut and row.tokens == [6, 7, 8, 9] and (row.start, row.end) == (1, 4)


def test_max_examples(tok):
    _, results = core.evaluate_core(TableModel(tok.vocab_size), tok, prepared(), max_examples=3)
    assert [r.examples for r in results] == [3, 3, 3]


def test_missing_and_corrupt_bundles(tmp_path):
    with pytest.raises(EvalDataMissing, match="chatlm fetch evals"):
        core.prepare_core(tmp_path / "nothing")
    bundle = tmp_path / "core"
    shutil.copytree(BUNDLE, bundle)
    path = bundle / "eval_data" / "language_understanding" / "winogrande.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"winogrande.jsonl:7: not JSON"):
        core.prepare_core(bundle)
    path.write_text(json.dumps({"continuation": "x", "gold": 0}) + "\n")
    with pytest.raises(DataError, match="needs context_options"):
        core.prepare_core(bundle)
    path.unlink()
    with pytest.raises(EvalDataMissing, match="winogrande.jsonl is missing"):
        core.prepare_core(bundle)
    with pytest.raises(DataError, match=r"\['hellaswag'\] not in"):
        core.prepare_core(BUNDLE, ["hellaswag"])
