"""Chat evals: task files, nanochat's prompt, letter-logit scoring, answer extraction, generative
scoring with batched generation and tool calls, pass@k, ChatCORE; oracle and uniform models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatlm.data.shards import DataError
from chatlm.engine.padded import generate_padded
from chatlm.engine.tools import ToolTokens, calculate
from chatlm.evals import chat
from chatlm.evals.errors import EvalDataMissing
from tests.evals.conftest import FIXTURES, TableModel

DATA = FIXTURES


def answer_ids(tok, row, task):
    if task in chat.CATEGORICAL:
        return tok.encode(chat.LETTERS[int(row["answer"])])
    if task == "humaneval":
        return tok.encode(row["prompt"] + row["canonical_solution"])
    return tok.encode(row["answer"])


def oracle_for(tok, task, rows):
    end = tok.encode_special("<|assistant_end|>")
    seqs = []
    for row in rows:
        user = (
            chat.mc_message(row["question"], row["choices"])
            if task in chat.CATEGORICAL
            else row.get("question", row.get("prompt"))
        )
        seqs.append(chat.prompt_ids(tok, user) + answer_ids(tok, row, task) + [end])
    return TableModel(tok.vocab_size, seqs)


def greedy(model, tok, batch_size=8, max_new_tokens=160):
    stop = [tok.encode_special("<|assistant_end|>"), tok.bos_id]
    return lambda prompts: generate_padded(
        model, prompts, tok.bos_id, max_new_tokens, stop_ids=stop, tools=ToolTokens(tok), batch_size=batch_size
    )


def test_mc_message_is_nanochats():
    assert chat.mc_message("Q?", ["x", "y"]) == (
        "Multiple Choice question: Q?\n- x=A\n- y=B\n\nRespond only with the letter of the correct answer."
    )


def test_task_order_is_numpys_permutation():
    rows = chat.load_task("mmlu", DATA)
    order = np.random.default_rng(42).permutation(len(rows))
    assert [r["id"] for r in chat.select(rows, 3)] == [rows[int(i)]["id"] for i in order[:3]]


@pytest.mark.parametrize("task", chat.CATEGORICAL)
def test_categorical_oracle_and_uniform(tok, task):
    rows = chat.select(chat.load_task(task, DATA), -1)
    assert chat.evaluate_categorical(oracle_for(tok, task, rows), tok, task, rows, batch_size=3).accuracy == 1.0
    uniform = chat.evaluate_categorical(TableModel(tok.vocab_size), tok, task, rows)
    assert uniform.accuracy == pytest.approx(0.25)  # 4 choices everywhere; a tie is 1/4 credit


def test_categorical_batches_prompts(tok):
    rows = chat.load_task("arc_easy", DATA)
    model = TableModel(tok.vocab_size)
    chat.evaluate_categorical(model, tok, "arc_easy", rows, batch_size=32)
    assert model.forwards == 1


def test_categorical_same_result_at_any_batch_size(tok, gpt):
    rows = chat.load_task("mmlu", DATA)
    per = {b: chat.evaluate_categorical(gpt, tok, "mmlu", rows, batch_size=b).per_example for b in (1, 3, 8)}
    assert per[1] == per[3] == per[8]


def test_final_number():
    assert chat.final_number("so 3 + 5 = 8.\n#### 8") == "8"
    assert chat.final_number("#### 1,234") == "1234"
    assert chat.final_number("#### -7.") == "-7"
    assert chat.final_number("the answer is 8") is None


@pytest.mark.parametrize("task", ["gsm8k", "spelling_bee"])
def test_generative_oracle_and_uniform(tok, task):
    rows = chat.select(chat.load_task(task, DATA), 6)
    oracle = oracle_for(tok, task, rows)
    result = chat.evaluate_generative(oracle, tok, task, rows, greedy(oracle, tok))
    assert result.accuracy == 1.0 and result.extra == {"pass@1": 1.0}
    uniform = TableModel(tok.vocab_size)
    assert chat.evaluate_generative(uniform, tok, task, rows, greedy(uniform, tok)).accuracy == 0.0


def test_generation_is_batched_and_independent_of_the_batch(tok, gpt):
    rows = chat.load_task("gsm8k", DATA)
    prompts = [chat.prompt_ids(tok, r["question"]) for r in rows]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    alone = [generate_padded(gpt, [p], tok.bos_id, 12)[0] for p in prompts]
    model = TableModel(tok.vocab_size)
    generate_padded(model, prompts, tok.bos_id, 5, batch_size=8)
    assert model.forwards == 5  # one forward per step for all four prompts
    assert generate_padded(gpt, prompts, tok.bos_id, 12, batch_size=8) == alone


def test_tool_calls_force_the_calculator_output(tok):
    ps, pe = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    os_, oe = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    end = tok.encode_special("<|assistant_end|>")
    prompt = chat.prompt_ids(tok, "What is 6 times 7?")
    call = [ps, *tok.encode("6*7"), pe]
    after = [*tok.encode(" so #### 42"), end]
    # the model knows the call and what follows the tool output, never the output itself
    model = TableModel(tok.vocab_size, [prompt + call, prompt + call + [os_, *tok.encode("42"), oe] + after])
    model.table.pop(tuple(prompt + call), None)  # nothing predicts the token after <|python_end|>
    out = generate_padded(model, [prompt], tok.bos_id, 40, stop_ids=[end], tools=ToolTokens(tok))[0]
    assert out == call + [os_, *tok.encode("42"), oe] + after[:-1]


def test_calculator():
    assert calculate("6*7") == "42" and calculate("1,000 + 1") == "1001" and calculate("7/2") == "3.5"
    assert calculate("'strawberry'.count('r')") == "3"
    for bad in ("__import__('os').system('x')", "2**100000", "open('f')", "1/0", "x + 1", ""):
        assert calculate(bad) is None


def test_pass_at_k():
    assert chat.pass_at_k(5, 0, 1) == 0.0 and chat.pass_at_k(5, 5, 3) == 1.0
    assert chat.pass_at_k(4, 1, 1) == pytest.approx(0.25) and chat.pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_humaneval_oracle_passes_in_the_sandbox(tok):
    from chatlm.evals.sandbox import SandboxLimits, run_many

    rows = chat.load_task("humaneval", DATA)
    oracle = oracle_for(tok, "humaneval", rows)
    runner = lambda programs: [r.passed for r in run_many(programs, SandboxLimits(timeout_s=10), workers=2)]  # noqa: E731
    result = chat.evaluate_generative(oracle, tok, "humaneval", rows, greedy(oracle, tok, 2), run_programs=runner)
    assert result.accuracy == 1.0
    wrong = [dict(r, canonical_solution="    return None\n") for r in rows]
    bad_oracle = oracle_for(tok, "humaneval", wrong)
    result = chat.evaluate_generative(bad_oracle, tok, "humaneval", rows, greedy(bad_oracle, tok), 1, runner)
    assert result.accuracy == 0


def test_humaneval_program():
    row = {"prompt": "import math\nfrom x import y\n\ndef f():\n", "test": "def check(c):\n    pass\n"}
    program = chat.humaneval_program({**row, "entry_point": "f"}, "Here:\n```python\ndef f():\n    return 1\n```\nDone")
    want = "import math\nfrom x import y\n\ndef f():\n    return 1\n\n\ndef check(c):\n    pass\n\ncheck(f)\n"
    assert program == want


def test_chatcore():
    acc = {"arc_easy": 0.5, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.1, "humaneval": 0.0}
    assert chat.chatcore(acc, complete=True) == pytest.approx((1 / 3 + 0 + 0 + 0.1 + 0) / 5)
    assert chat.chatcore(acc, complete=False) is None
    assert chat.chatcore({k: v for k, v in acc.items() if k != "mmlu"}, complete=True) is None


def test_spelling_bee_items_are_fixed_and_right():
    words = chat.load_words(DATA)
    items = chat.spelling_bee_items(words, n=50)
    assert items == chat.spelling_bee_items(words, n=50)
    for it in items:
        assert chat.final_number(it["answer"]) == str(it["word"].count(it["letter"]))
    assert sum(it["word"].count(it["letter"]) > 0 for it in items) > 30


def test_missing_and_corrupt_task_files(tmp_path):
    with pytest.raises(EvalDataMissing, match="chatlm fetch evals"):
        chat.load_task("gsm8k", tmp_path)
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "gsm8k.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="gsm8k.jsonl:1: a gsm8k row needs answer"):
        chat.load_task("gsm8k", tmp_path)


def test_changing_shapes_run_on_an_inference_backend(gpt):
    """flex compiles per shape, so scoring and generation switch a flex model to sdpa (fa4 on a
    GPU that has it) while they run, and give it back."""
    from chatlm.engine.padded import inference_attention

    gpt.attention_backend = "flex"
    try:
        with inference_attention(gpt) as model:
            assert model.attention_backend == "sdpa"
        assert gpt.attention_backend == "flex"
    finally:
        gpt.attention_backend = "sdpa"


def test_words_fall_back_to_the_embedded_corpus(tmp_path, monkeypatch, caplog):
    """No words.txt and no system word list: the words the embedded corpus uses at least 5 times."""
    from chatlm.data import sources
    from chatlm.evals import chat as chat_mod

    text = "The whale, the WHALE: whale whale whale whale the the sea sea sea sea sea ok ok ok ok ok ok"
    monkeypatch.setattr(chat_mod, "WORD_LISTS", (str(tmp_path / "none"),))
    monkeypatch.setattr(chat_mod, "_EMBEDDED_WORDS", [])
    monkeypatch.setattr(sources, "iter_embedded_documents", lambda verify=True: iter([{"text": text}] * 1))
    # 'the' is there 4 times in lower case, 'ok' is too short, 'WHALE' is not lower case
    assert chat_mod.load_words(tmp_path) == ["sea", "whale"]
    assert "embedded corpus" in caplog.text
