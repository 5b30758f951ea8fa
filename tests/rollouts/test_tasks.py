"""The RL tasks' rewards on hand-written completions (right, wrong, malformed, tool-call
answers), their generated problems (solvable, deterministic, disjoint from the eval slices and
from SpellingBee's words) and the task files' bad input."""

from __future__ import annotations

import json
import re

import pytest

from chatlm.config import RLTaskConfig
from chatlm.data.shards import DataError
from chatlm.errors import ConfigError
from chatlm.rollouts import problems
from chatlm.rollouts.problems import Problem
from chatlm.rollouts.sampling import visible_text
from chatlm.rollouts.tasks import ProblemTask, build_task, check_countdown, check_number


def numeric(format_reward: float = 0.0) -> ProblemTask:
    return ProblemTask("t", [], [], check_number, format_reward)


@pytest.mark.parametrize(
    "completion, reward, with_format",
    [
        ("6 times 7 is 42.\n#### 42", 1.0, 1.0),
        ("#### 42\nand then some more text", 1.0, 1.0),
        ("#### 41", 0.0, 0.25),  # well-formed, wrong
        ("#### 42.", 1.0, 1.0),  # a sentence's full stop is not part of the number
        ("the answer is 42", 0.0, 0.0),  # no '####': no answer
        ("####42", 0.0, 0.0),  # GSM8K's format has a space
        ("#### forty-two", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_numeric_rewards(completion, reward, with_format):
    problem = Problem("p", "What is 6*7?", "42")
    assert numeric().reward(completion, problem) == reward
    assert numeric(0.25).reward(completion, problem) == with_format


def test_commas_are_dropped_as_gsm8k_writes_them():
    assert numeric().reward("#### 1,234", Problem("p", "q", "1234")) == 1.0


def test_a_calculator_answer_counts_as_the_models(rl_tok):
    tok = rl_tok

    def special(name):
        return tok.encode_special(name)

    def call(expression, result):
        return [
            special("<|python_start|>"),
            *tok.encode(expression),
            special("<|python_end|>"),
            special("<|output_start|>"),
            *tok.encode(result),
            special("<|output_end|>"),
        ]

    problem = Problem("p", "q", "42")
    # the answer after '####' is the calculator's output
    tokens = [*tok.encode("So the total is "), *call("6*7", "42"), *tok.encode(".\n#### "), *call("40+2", "42")]
    tokens.append(special("<|assistant_end|>"))
    text = visible_text(tok, tokens)
    assert text == "So the total is 42.\n#### 42"
    assert numeric().reward(text, problem) == 1.0
    assert numeric().reward(tok.decode(tokens), problem) == 0.0  # the raw text has the call, not the number
    # a call whose output was never forced (no result) leaves nothing behind
    unclosed = [*tok.encode("#### "), special("<|python_start|>"), *tok.encode("42")]
    assert visible_text(tok, unclosed) == "#### " and numeric().reward(visible_text(tok, unclosed), problem) == 0.0


@pytest.mark.parametrize(
    "completion, verdict",
    [
        ("#### 25*3+4", True),
        ("Let me try.\n#### (25 * 3) + 4 = 79", True),
        ("#### 4 + 3 * 25.", True),
        ("#### 25*3+4+7", False),  # 86
        ("#### 25*3*1+4", False),  # 1 is not given
        ("#### 25*3+4-4+4", False),  # 4 is given once
        ("#### 79", False),  # the target is not a given number
        ("#### 25**2", None),  # not + - * /
        ("#### twenty-five", None),
        ("25*3+4", None),  # no '####'
    ],
)
def test_countdown_rewards(completion, verdict):
    problem = Problem("c", "q", "79", (25, 3, 4, 7))
    assert check_countdown(completion, problem) is verdict
    assert ProblemTask("c", [], [], check_countdown, 0.5).reward(completion, problem) == {True: 1.0, False: 0.5}.get(
        verdict, 0.0
    )


def test_countdown_division_is_exact():
    assert check_countdown("#### 6/3*4", Problem("c", "q", "8", (6, 3, 4)))
    assert check_countdown("#### 7/3*3", Problem("c", "q", "7", (7, 3, 3)))  # 7/3 is not rounded
    assert not check_countdown("#### 6/(3-3)", Problem("c", "q", "8", (6, 3, 3)))


def test_generated_countdown_problems_are_solvable_and_fixed():
    made = problems.countdown(300, seed=5, numbers=4)
    assert made == problems.countdown(300, seed=5, numbers=4)
    assert made != problems.countdown(300, seed=6, numbers=4)
    for p in made:
        assert len(p.numbers) == 4 and int(p.answer) not in p.numbers and 2 <= int(p.answer) <= 999
        assert check_countdown(p.solution, p) is True, p
        assert str(p.answer) in p.question and ", ".join(map(str, p.numbers)) in p.question


def test_generated_arithmetic_is_sfts_generator_on_other_seeds():
    from chatlm.data.chat.generated import arithmetic

    made = problems.arithmetic(50, seed=1000)
    assert all(check_number(p.solution, p) for p in made)
    sft = {c["messages"][0]["content"] for c in arithmetic(50, 42)}
    assert not sft & {p.question for p in made}


def test_generated_eval_slices_are_disjoint_from_training(tmp_path):
    for kind in ("arithmetic", "countdown"):
        cfg = RLTaskConfig(name=kind, kind=kind, size=400, eval_size=400, seed=3, numbers=3)
        task = build_task(cfg, 0.0, str(tmp_path), eval_examples=50)
        train = {p.question for p in task.prompts()}
        assert len(task.eval_split()) == 50 and not train & {p.question for p in task.eval_split()}


def test_arithmetic_eval_slice_leaves_out_what_the_shipped_sft_mixtures_train_on(tmp_path):
    from chatlm.data.chat.generated import arithmetic

    cfg = RLTaskConfig(name="arithmetic", kind="arithmetic", size=100, eval_size=500, seed=1000)
    task = build_task(cfg, 0.0, str(tmp_path), eval_examples=500)
    sft = {c["messages"][0]["content"] for c in arithmetic(4000, 42)}  # conf/mixture/offline.yaml's source
    evaluation = {p.question for p in task.eval_split()}
    assert 400 < len(evaluation) < 500 and not sft & evaluation  # 41 of the 500 were SFT questions


def test_spelling_trains_off_spellingbees_words_and_is_scored_on_them(tmp_path):
    from chatlm.evals.chat import spelling_bee_items

    (tmp_path / "chat").mkdir()
    words = sorted({"".join(w) for w in zip("abcdefghijklmnop" * 40, "aeiou" * 128, "lmnrstp" * 92)})
    (tmp_path / "chat" / "words.txt").write_text("\n".join(words * 2) + "\n")
    cfg = RLTaskConfig(name="spelling", kind="spelling", size=300)
    task = build_task(cfg, 0.0, str(tmp_path), eval_examples=20)
    from chatlm.evals.chat import load_words

    held = {item["word"] for item in spelling_bee_items(load_words(tmp_path))}
    asked = [re.search(r"in (?:the word )?'?([a-z]+)'?[?.]$", p.question).group(1) for p in task.prompts()]
    assert len(set(asked)) > 50 and not held & set(asked)
    for p in task.prompts():
        assert check_number(p.solution, p)
    assert [p.question for p in task.eval_split()] == [i["question"] for i in spelling_bee_items(load_words(tmp_path))][
        :20
    ]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_task_holds_out_its_eval_slice(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(30)]
    cfg = RLTaskConfig(name="mine", kind="jsonl", path=str(_write(tmp_path / "p.jsonl", rows)), eval_size=5)
    task = build_task(cfg, 0.0, str(tmp_path), eval_examples=400)
    assert len(task.prompts()) == 25 and len(task.eval_split()) == 5
    assert not {p.question for p in task.prompts()} & {p.question for p in task.eval_split()}
    assert all(p.answer == p.question[1:] for p in task.prompts())
    # a question the file repeats is held out with every copy: pass@k never scores a trained prompt
    rows = [{"question": f"q{i % 10}", "answer": f"#### {i % 10}"} for i in range(30)]
    cfg = RLTaskConfig(name="mine", kind="jsonl", path=str(_write(tmp_path / "r.jsonl", rows)), eval_size=3)
    task = build_task(cfg, 0.0, str(tmp_path), eval_examples=400)
    held = {p.question for p in task.eval_split()}
    assert len(task.eval_split()) == 3 and not held & {p.question for p in task.prompts()}
    assert len(task.prompts()) == 30 - 3 * len(held)


def test_task_files_bad_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no problems") as e:
        build_task(RLTaskConfig(kind="jsonl", path=str(tmp_path / "empty.jsonl")), 0.0, str(tmp_path), 10)
    assert e.value.key == "rl_task.path"
    evals = tmp_path / "evals" / "chat" / "gsm8k.jsonl"
    evals.parent.mkdir(parents=True)
    _write(evals, [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(ConfigError, match="never training sources"):
        build_task(RLTaskConfig(kind="jsonl", path=str(evals)), 0.0, str(tmp_path), 10)
    with pytest.raises(DataError, match="chatlm fetch sft --sources gsm8k_train"):
        build_task(RLTaskConfig(kind="gsm8k", path=str(tmp_path / "none.jsonl")), 0.0, str(tmp_path), 10)
    with pytest.raises(ConfigError) as e:
        RLTaskConfig(kind="jsonl")
    assert e.value.key == "rl_task.path"
