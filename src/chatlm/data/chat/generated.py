"""Conversations generated here, offline and from a fixed seed (the `identity`, `spelling` and
`arithmetic` sources of an SFT mixture).

- identity: who the model is, from a YAML the user can edit (`identity.yaml` in this package).
- spelling: spell a word letter by letter, and count a letter in a word (spelling it out, then
  checking with the calculator's `'word'.count('x')`), in the answer format SpellingBee scores
  (`#### <n>`). Words come from the system word list; the words of SpellingBee's eval items are
  never used.
- arithmetic: short word problems whose answers compute with calculator tool calls
  (`<|python_start|> 12*7 <|python_end|>`, the result forced in as tool output), ending `#### <n>`.

Conversation i of a source is drawn from `random.Random(f"{kind}:{seed}:{i}")`, so a source's
conversations do not depend on how many are generated.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from chatlm.data.shards import DataError

IDENTITY_FILE = Path(__file__).with_name("identity.yaml")


def _rng(kind: str, seed: int, i: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{i}")


def _chat(user: str, assistant: Any) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ----------------------------------------------------------------------------------------------
# identity


def read_identity(path: Optional[str]) -> dict:
    """The identity YAML (name, maker, facts: [{questions, answers}], greetings), checked."""
    where = Path(path).expanduser() if path else IDENTITY_FILE
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"identity file {where}: {e.strerror}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise DataError(f"identity file {where}: not YAML ({at}{getattr(e, 'problem', None) or e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("maker"), str):
        raise DataError(f"identity file {where}: needs string fields 'name' and 'maker'")
    facts = data.get("facts")
    if not isinstance(facts, list) or not facts:
        raise DataError(f"identity file {where}: needs a non-empty list 'facts' of {{questions, answers}}")
    for n, fact in enumerate(facts):
        for key in ("questions", "answers"):
            items = fact.get(key) if isinstance(fact, dict) else None
            if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
                raise DataError(f"identity file {where}: facts[{n}].{key} must be a non-empty list of strings")
        for m, answer in enumerate(fact["answers"]):
            try:
                answer.format(name=data["name"], maker=data["maker"])
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(
                    f"identity file {where}: facts[{n}].answers[{m}] {answer!r}: only {{name}} and {{maker}} are "
                    f"filled in (write a literal brace twice, {{{{ or }}}}): {type(e).__name__}: {e}"
                ) from e
    return data


def identity(n: int, seed: int, path: Optional[str] = None) -> list[dict]:
    data = read_identity(path)
    fill = {"name": data["name"], "maker": data["maker"]}
    greetings = [g for g in data.get("greetings") or [] if isinstance(g, str)]
    out = []
    for i in range(n):
        rng = _rng("identity", seed, i)
        fact = rng.choice(data["facts"])
        question, answer = rng.choice(fact["questions"]), rng.choice(fact["answers"]).format(**fill)
        if greetings and rng.random() < 0.3:
            hello = rng.choice(greetings)
            messages = [
                {"role": "user", "content": hello},
                {"role": "assistant", "content": f"Hello! I'm {data['name']}. How can I help?"},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            out.append({"messages": messages})
        else:
            out.append(_chat(question, answer))
    return out


# ----------------------------------------------------------------------------------------------
# spelling and letter counting

SPELL_PROMPTS = ("Spell the word: {w}", "How do you spell '{w}'?", "Spell {w} letter by letter.")
COUNT_PROMPTS = (
    "How many times does the letter '{c}' appear in the word '{w}'?",
    "How many {c}s are in {w}?",
    "Count the letter '{c}' in '{w}'.",
)


def training_words(words: Sequence[str]) -> list[str]:
    """The word list without the words of SpellingBee's eval items (chatlm.evals.chat)."""
    from chatlm.evals.chat import spelling_bee_items

    held = {item["word"] for item in spelling_bee_items(words)}
    return [w for w in words if w not in held]


def spelling(n: int, seed: int, words: Sequence[str]) -> list[dict]:
    pool = training_words(words)
    if not pool:
        raise DataError("the spelling source needs a word list with words beyond SpellingBee's eval items")
    out = []
    for i in range(n):
        rng = _rng("spelling", seed, i)
        word = rng.choice(pool)
        spelled = ",".join(word)
        if rng.random() < 0.35:
            out.append(_chat(rng.choice(SPELL_PROMPTS).format(w=word), f"{word}:{spelled}"))
            continue
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        parts = [
            {"type": "text", "text": f"Let me spell '{word}' out: {spelled}. I count the '{letter}'s with Python: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\nThe letter '{letter}' appears {count} times in '{word}'.\n#### {count}"},
        ]
        out.append(_chat(rng.choice(COUNT_PROMPTS).format(c=letter, w=word), parts))
    return out


# ----------------------------------------------------------------------------------------------
# arithmetic word problems with calculator calls

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena")
THINGS = ("apples", "books", "stickers", "marbles", "coins", "pencils", "cookies", "stamps", "shells", "cards")


def _times(rng: random.Random) -> tuple[str, str, int, str]:
    who, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 25)
    q = f"{who} has {a} bags with {b} {thing} in each bag. How many {thing} does {who} have?"
    return q, f"{a}*{b}", a * b, f"{who} has {a * b} {thing}."


def _plus_minus(rng: random.Random) -> tuple[str, str, int, str]:
    who, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(20, 500), rng.randint(5, 200)
    c = rng.randint(1, a + b)
    q = f"{who} had {a} {thing}, got {b} more, then gave away {c}. How many {thing} are left?"
    return q, f"{a}+{b}-{c}", a + b - c, f"{who} has {a + b - c} {thing} left."


def _share(rng: random.Random) -> tuple[str, str, int, str]:
    thing = rng.choice(THINGS)
    k, each = rng.randint(2, 12), rng.randint(2, 30)
    q = f"{k * each} {thing} are shared equally among {k} friends. How many {thing} does each friend get?"
    return q, f"{k * each}//{k}", each, f"Each friend gets {each} {thing}."


def _price(rng: random.Random) -> tuple[str, str, int, str]:
    who = rng.choice(NAMES)
    n, price, paid_extra = rng.randint(2, 9), rng.randint(3, 60), rng.randint(0, 50)
    paid = n * price + paid_extra
    q = f"{who} buys {n} tickets at ${price} each and pays with ${paid}. How much change does {who} get?"
    return q, f"{paid}-{n}*{price}", paid_extra, f"{who} gets ${paid_extra} in change."


PROBLEMS: tuple[Callable[[random.Random], tuple[str, str, int, str]], ...] = (_times, _plus_minus, _share, _price)


def arithmetic(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        rng = _rng("arithmetic", seed, i)
        question, expression, value, sentence = rng.choice(PROBLEMS)(rng)
        parts = [
            {"type": "text", "text": "I'll compute it: "},
            {"type": "python", "text": expression},
            {"type": "python_output", "text": str(value)},
            {"type": "text", "text": f"\n{sentence}\n#### {value}"},
        ]
        out.append(_chat(question, parts))
    return out
