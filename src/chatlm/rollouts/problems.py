"""The problems of the RL tasks: generated offline from fixed seeds, or read from the evals' data.

- arithmetic: the word problems of SFT's `arithmetic` source (`chatlm.data.chat.generated`), from
  other seeds than SFT's (SFT uses `mixture.seed` 42 plus a small source seed; RL 1000 and 1001).
- countdown: `numbers` numbers (1..10, sometimes one of 25/50/75/100) and a target reached by
  combining some of them with + - * / (every intermediate result a positive integer). Problem i
  of a seed is drawn from `random.Random(f"countdown:{seed}:{i}")`.
- letter counts: the questions of SFT's spelling source on the word list without SpellingBee's
  eval words (`generated.training_words`), from `random.Random(f"rl-spelling:{seed}:{i}")`.
- evaluation slices of eval tasks: SpellingBee's items and GSM8K test, read as the chat evals do.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

from chatlm.data.shards import DataError
from chatlm.evals.chat import final_number


@dataclass(frozen=True)
class Problem:
    """One question with a verifiable answer."""

    id: str
    question: str
    answer: str  # the number a right completion writes after '####' (countdown: the target)
    numbers: tuple[int, ...] = ()  # countdown: the numbers given
    solution: str = ""  # a right completion (as the user sees it), when the generator knows one

    def conversation(self) -> dict:
        """The prompt: the question, then the assistant's turn to complete."""
        return {"messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": ""}]}


def arithmetic(n: int, seed: int) -> list[Problem]:
    """SFT's arithmetic word problems as RL problems (the answer after '####')."""
    from chatlm.data.chat.generated import arithmetic as conversations

    out = []
    for i, conv in enumerate(conversations(n, seed)):
        user, reply = conv["messages"]
        parts = reply["content"]
        answer = final_number(parts[-1]["text"])
        assert answer is not None, parts
        seen = "".join(p["text"] for p in parts if p["type"] != "python")  # what the user reads
        out.append(Problem(f"arithmetic/{seed}/{i}", user["content"], answer, solution=seen))
    return out


# ----------------------------------------------------------------------------------------------
# countdown

LARGE = (25, 50, 75, 100)
COUNTDOWN_QUESTION = (
    "Using the numbers {numbers}, each at most once, with + - * / and parentheses, make {target}. "
    "Write the expression after ####."
)


def _combine(rng: random.Random, values: list[int]) -> tuple[int, str]:
    """Combine the values pairwise with random operations into one (value, expression)."""
    items = [(v, str(v)) for v in values]
    while len(items) > 1:
        (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        if a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        value = {"+": a + b, "*": a * b, "-": a - b, "/": a // b if b else 0}[op]
        items.append((value, f"({ea} {op} {eb})"))
    value, expression = items[0]
    return value, expression[1:-1] if expression.startswith("(") else expression


def countdown(n: int, seed: int, numbers: int = 4) -> list[Problem]:
    """n countdown problems (module docstring); the target is 2..999 and not one of the numbers."""
    out = []
    for i in range(n):
        rng = random.Random(f"countdown:{seed}:{i}")
        while True:
            given = [rng.randint(1, 10) for _ in range(numbers)]
            if rng.random() < 0.5:
                given[0] = rng.choice(LARGE)
            rng.shuffle(given)
            value, expression = _combine(rng, rng.sample(given, rng.randint(2, numbers)))
            if 2 <= value <= 999 and value not in given:
                break
        question = COUNTDOWN_QUESTION.format(numbers=", ".join(map(str, given)), target=value)
        out.append(Problem(f"countdown/{seed}/{i}", question, str(value), tuple(given), f"#### {expression}"))
    return out


_EXPRESSION = re.compile(r"[0-9+\-*/() \t]+")


def answer_expression(text: str) -> Optional[str]:
    """The arithmetic expression after `####` (up to the line's end or an '='), or None."""
    m = re.search(r"####[ \t]*([^\n]*)", text)
    if m is None:
        return None
    expression = m.group(1).split("=")[0].strip().rstrip(".").strip()
    if not expression or not _EXPRESSION.fullmatch(expression) or "**" in expression or "//" in expression:
        return None
    return expression


def _exact(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_exact(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _exact(node.left), _exact(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            return a / b  # ZeroDivisionError for b == 0
    raise ValueError("not + - * / of integers")


def reaches(expression: str, numbers: Sequence[int], target: int) -> bool:
    """Whether `expression` uses only `numbers` (each at most once) and equals `target` exactly."""
    used = Counter(int(x) for x in re.findall(r"\d+", expression))
    if used - Counter(numbers):
        return False
    try:
        return _exact(ast.parse(expression, mode="eval").body) == target
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False


# ----------------------------------------------------------------------------------------------
# letter counting and the eval slices of eval tasks


def letter_counts(n: int, seed: int, words: Sequence[str]) -> list[Problem]:
    """n letter-counting questions on the words SpellingBee does not score (a letter of the word
    three times out of four)."""
    from chatlm.data.chat.generated import COUNT_PROMPTS, training_words

    pool = training_words(words)
    if not pool:
        raise DataError("the spelling task needs a word list with words beyond SpellingBee's eval items")
    out = []
    for i in range(n):
        rng = random.Random(f"rl-spelling:{seed}:{i}")
        word = rng.choice(pool)
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice(COUNT_PROMPTS).format(c=letter, w=word)
        out.append(Problem(f"spelling/{seed}/{i}", question, str(count), solution=f"#### {count}"))
    return out


def spelling_bee(words: Sequence[str], n: int) -> list[Problem]:
    """SpellingBee's first n items (its eval split: scored, never trained on)."""
    from chatlm.evals.chat import spelling_bee_items

    items = spelling_bee_items(words)[:n]
    return [Problem(item["id"], item["question"], str(final_number(item["answer"]))) for item in items]


def gsm8k_test(evals_dir: str, n: int) -> list[Problem]:
    """GSM8K test in the chat evals' order, the first n (`chatlm fetch evals`)."""
    from chatlm.evals.chat import prepare_task

    rows = prepare_task("gsm8k", evals_dir, n)
    return [Problem(f"gsm8k_test/{i}", r["question"], str(final_number(r["answer"]))) for i, r in enumerate(rows)]
