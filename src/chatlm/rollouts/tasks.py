"""RL tasks: problems with verifiable answers, and their rewards.

A task (`Task`) is its training problems (`prompts()`), the slice pass@k is measured on
(`eval_split()`) and `reward(completion_text, problem) -> float`. A problem is one user question;
its prompt is the question rendered for completion (`Problem.conversation`). The completion text
a reward reads is what the user would see: a calculator call is replaced by its output, so
`#### <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>` answers 42 (the
calculator's output counts as the model's; `chatlm.rollouts.sampling.visible_text`).

Rewards: 1.0 for a right answer; `format_reward` (0 by default, nanochat's 0/1 reward) for a
well-formed but wrong one; 0.0 when there is no answer. Numeric tasks compare the number after
`#### ` as the chat evals do (`chatlm.evals.chat.final_number`); countdown checks the expression
after `####` exactly (rational arithmetic, each given number used at most once).

| kind       | training problems                                        | eval slice                              |
|------------|----------------------------------------------------------|-----------------------------------------|
| gsm8k      | GSM8K train (`chatlm fetch sft --sources gsm8k_train`)   | GSM8K test (`chatlm fetch evals`)       |
| arithmetic | SFT's word-problem generator, seed `rl_task.seed`        | the same generator, seed + 1            |
| countdown  | generated here (`chatlm.rollouts.problems`)              | seed + 1                                |
| spelling   | letter counts on the word list minus SpellingBee's words | SpellingBee's items (evaluation only)   |
| jsonl      | your {question, answer} file                             | `eval_path`, or `eval_size` held out    |

Generated evaluation problems that also occur among the training problems are dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from chatlm.data.shards import DataError
from chatlm.errors import ConfigError
from chatlm.evals.chat import final_number
from chatlm.rollouts import problems
from chatlm.rollouts.problems import Problem


class Task(Protocol):
    name: str

    def prompts(self) -> Sequence[Problem]: ...

    def eval_split(self) -> Sequence[Problem]: ...

    def reward(self, completion: str, problem: Problem) -> float: ...


#: (completion text, problem) -> True (right), False (well-formed, wrong) or None (no answer)
Checker = Callable[[str, Problem], Optional[bool]]


def check_number(text: str, problem: Problem) -> Optional[bool]:
    """The number after `#### ` against the problem's (commas dropped, as the GSM8K eval)."""
    got = final_number(text)
    return None if got is None else got == problem.answer


def check_countdown(text: str, problem: Problem) -> Optional[bool]:
    """The expression after `####` (a trailing `= N` ignored): only the given numbers, each at most
    once, + - * / and parentheses, and exactly the target."""
    expression = problems.answer_expression(text)
    if expression is None:
        return None
    return problems.reaches(expression, problem.numbers, int(problem.answer))


@dataclass
class ProblemTask:
    """A `Task` over lists of problems and a checker (see the module docstring)."""

    name: str
    train: list[Problem]
    evaluation: list[Problem]
    check: Checker
    format_reward: float = 0.0
    notes: tuple[str, ...] = ()  # what was dropped or where the data came from, for the log

    def prompts(self) -> Sequence[Problem]:
        return self.train

    def eval_split(self) -> Sequence[Problem]:
        return self.evaluation

    def reward(self, completion: str, problem: Problem) -> float:
        verdict = self.check(completion, problem)
        if verdict:
            return 1.0
        return self.format_reward if verdict is not None else 0.0


# ----------------------------------------------------------------------------------------------
# building the tasks of conf/rl_task/


#: (seed, size) of the arithmetic source of the shipped SFT mixtures (mixture.seed 42 + source seed 0)
SFT_ARITHMETIC = (42, 4000)


def _disjoint(evaluation: list[Problem], train: Sequence[Problem]) -> list[Problem]:
    seen = {(p.question, p.numbers) for p in train}
    return [p for p in evaluation if (p.question, p.numbers) not in seen]


def read_problems(path: Path, key: str, max_examples: int = -1) -> list[Problem]:
    """{question, answer ending '#### N' (or final)} per line; lines without a final number are skipped."""
    from chatlm.evals.records import read_records
    from chatlm.evals.tasks import refuse_eval_only

    if key == "rl_task.path":
        refuse_eval_only(str(path), key)
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist")
    if not path.read_text(encoding="utf-8").strip():
        raise ConfigError(key, f"{path} holds no problems: a task needs at least one prompt")
    out = []
    for n, rec in enumerate(read_records(path, ("question", "answer"), "a problem")):
        answer = rec.get("final")
        answer = str(answer).replace(",", "") if answer is not None else final_number(str(rec["answer"]))
        if answer is not None:
            out.append(Problem(str(rec.get("id", f"{path.stem}/{n}")), str(rec["question"]), answer))
    return out if max_examples < 0 else out[:max_examples]


def _generated(cfg: Any, make: Callable[[int, int], list[Problem]]) -> tuple[list[Problem], list[Problem]]:
    train = make(cfg.size, cfg.seed)
    return train, _disjoint(make(cfg.eval_size, cfg.seed + 1), train) if cfg.eval_size else []


def build_task(cfg: Any, format_reward: float, evals_dir: str, eval_examples: int) -> ProblemTask:
    """The task of an `RLTaskConfig`; `evals_dir` holds the chat evals' data (GSM8K test, the word
    list); the eval slice is the first `eval_examples` problems (0: none)."""
    notes: list[str] = []
    check: Checker = check_number
    if cfg.kind == "arithmetic":
        train, evaluation = _generated(cfg, problems.arithmetic)
        # the template space is small: leave out the problems the shipped SFT mixtures train on
        # (conf/mixture/: seed 42, at most 4,000), so pass@k measures unseen questions
        evaluation = _disjoint(evaluation, problems.arithmetic(SFT_ARITHMETIC[1], SFT_ARITHMETIC[0]))
    elif cfg.kind == "countdown":
        train, evaluation = _generated(cfg, lambda n, seed: problems.countdown(n, seed, cfg.numbers))
        check = check_countdown
    elif cfg.kind == "spelling":
        from chatlm.evals.chat import load_words

        words = load_words(evals_dir)
        train = problems.letter_counts(cfg.size, cfg.seed, words)
        evaluation = problems.spelling_bee(words, eval_examples) if eval_examples else []
    elif cfg.kind == "gsm8k":
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"rl_task.path: {path} is missing: run `chatlm fetch sft --sources gsm8k_train` first")
        train = read_problems(path, "rl_task.path", cfg.max_examples)
        evaluation = problems.gsm8k_test(evals_dir, eval_examples) if eval_examples else []
        notes.append(f"training problems from {path}; pass@k on GSM8K test")
    elif cfg.kind == "jsonl":
        train = read_problems(Path(cfg.path).expanduser(), "rl_task.path")
        if cfg.eval_path:
            evaluation = read_problems(Path(cfg.eval_path).expanduser(), "rl_task.eval_path")
        else:
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            held = set(order[: min(cfg.eval_size, eval_examples, len(train) - 1)])
            evaluation = [p for i, p in enumerate(train) if i in held]
            # every copy of a held-out question leaves training (files repeat questions)
            train = _disjoint([p for i, p in enumerate(train) if i not in held], evaluation)
        if cfg.max_examples > 0:
            train = train[: cfg.max_examples]
    else:  # the schema refuses other kinds
        raise ConfigError("rl_task.kind", f"unknown kind {cfg.kind!r}")
    if not train:
        raise ConfigError("rl_task", f"task {cfg.name!r} has no training problems: a task needs at least one prompt")
    return ProblemTask(cfg.name, train, evaluation[:eval_examples], check, format_reward, tuple(notes))
