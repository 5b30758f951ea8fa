"""nanochat's chat evaluations (spec §6.3) and ChatCORE.

Every task's rows are shuffled with numpy's `default_rng(42).permutation` (nanochat's order) and
the first `max_examples` kept. Prompts are conversations rendered for completion (the user's
message, then `<|assistant_start|>`), so these evals score chat models (SFT/RL); a base model can
be scored too, it just has not learnt the format.

- categorical (ARC-Easy, ARC-Challenge, MMLU): the user message lists the choices as
  `- choice=LETTER` lines and asks for the letter; the prediction is the argmax of the logits
  after `<|assistant_start|>` over the choice letters' token ids (a tie shares the credit, as in
  CORE). Many prompts per forward pass.
- generative (GSM8K, HumanEval, SpellingBee): `num_samples` answers per problem from
  the KV-cache engine (`chatlm.engine`, batched, calculator tool calls); a problem passes if any
  answer passes. GSM8K and SpellingBee compare the number after `#### `; HumanEval runs the
  prompt's imports + the completion's code + the tests in `chatlm.evals.sandbox`.

ChatCORE is nanochat's: the mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of
`(acc - b) / (1 - b)`, b = 0.25 for the categorical tasks and 0 for the generative ones, reported
only when all five were scored on all their items (SpellingBee is scored but not part of it).
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from chatlm.data.shards import DataError
from chatlm.evals.core import tie_credit
from chatlm.evals.errors import EvalDataMissing
from chatlm.evals.records import read_records
from chatlm.evals.scoring import last_position_logits
from chatlm.tokenizer.chat_format import render_for_completion

log = logging.getLogger("chatlm")

LETTERS = "ABCDEFGHIJ"
SHUFFLE_SEED = 42
CATEGORICAL = ("arc_easy", "arc_challenge", "mmlu")
GENERATIVE = ("gsm8k", "humaneval", "spelling_bee")
CHATCORE_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")  # nanochat's five
BASELINES = {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0, "spelling_bee": 0.0}
_FIELDS = {
    "arc_easy": ("question", "choices", "answer"),
    "arc_challenge": ("question", "choices", "answer"),
    "mmlu": ("question", "choices", "answer"),
    "gsm8k": ("question", "answer"),
    "humaneval": ("prompt", "test", "entry_point"),
}

# ----------------------------------------------------------------------------------------------
# task data


def load_task(name: str, data_dir: str | Path) -> list[dict]:
    """A chat task's rows from `<data_dir>/chat/<name>.jsonl` (SpellingBee: generated)."""
    if name == "spelling_bee":
        return spelling_bee_items(load_words(data_dir))
    path = Path(data_dir).expanduser() / "chat" / f"{name}.jsonl"
    if not path.is_file():
        raise EvalDataMissing(f"task {name}: {path} is missing: run `chatlm fetch evals`")
    return read_records(path, _FIELDS[name], f"a {name} row")


def prepare_task(name: str, data_dir: str | Path, max_examples: int) -> list[dict]:
    """A chat task's rows in nanochat's order, the first max_examples (-1: all), read and checked."""
    return select(load_task(name, data_dir), max_examples)


def select(rows: Sequence[dict], max_examples: int) -> list[dict]:
    """nanochat's order (numpy default_rng(42) permutation), the first max_examples (-1: all)."""
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))
    picked = [rows[int(i)] for i in order]
    return picked if max_examples < 0 else picked[:max_examples]


WORD_LISTS = ("/usr/share/dict/words", "/usr/share/dict/american-english")
SPELLING_BEE_ITEMS = 256
SPELLING_BEE_SEED = 7


def load_words(data_dir: str | Path) -> list[str]:
    """Lower-case alphabetic words of 3-12 letters from `<data_dir>/chat/words.txt` or the
    system's word list (Debian's `wamerican`); on a machine with neither, the words used at least
    5 times in the embedded pretraining corpus (`embedded_words`), with a warning."""
    candidates = [Path(data_dir).expanduser() / "chat" / "words.txt", *map(Path, WORD_LISTS)]
    for path in candidates:
        if path.is_file():
            words = {w.strip() for w in path.read_text(encoding="utf-8", errors="replace").splitlines()}
            good = sorted(w for w in words if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12)
            if good:
                return good
    try:
        fallback = embedded_words()
    except DataError:
        fallback = []
    if not fallback:
        raise EvalDataMissing(
            "spelling_bee needs a word list: `apt-get install wamerican` (/usr/share/dict/words) "
            f"or one word per line in {candidates[0]}"
        )
    log.warning(
        "no word list (%s): using the %d words of the embedded corpus; `apt-get install wamerican` for the usual one",
        candidates[0],
        len(fallback),
    )
    return fallback


_EMBEDDED_WORDS: list[str] = []


def embedded_words(min_count: int = 5) -> list[str]:
    """Lower-case words of 3-12 letters that occur at least `min_count` times in the embedded
    corpus (public-domain books and speeches shipped with chatlm), sorted."""
    if not _EMBEDDED_WORDS:
        from collections import Counter

        from chatlm.data.sources import iter_embedded_documents

        counts: Counter = Counter()
        for doc in iter_embedded_documents(verify=False):
            counts.update(re.findall(r"\b[a-z]{3,12}\b", doc["text"]))
        _EMBEDDED_WORDS.extend(sorted(w for w, n in counts.items() if n >= min_count))
    return list(_EMBEDDED_WORDS)


def spelling_bee_items(words: Sequence[str], n: int = SPELLING_BEE_ITEMS, seed: int = SPELLING_BEE_SEED) -> list[dict]:
    """n letter-counting questions, item i drawn with Random(seed + i): a word, and a letter that
    is in it three times out of four."""
    items = []
    for i in range(n):
        rng = random.Random(seed + i)
        word = rng.choice(words)
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        items.append(
            {
                "id": f"spelling_bee/{i}",
                "question": f"How many times does the letter '{letter}' appear in the word '{word}'?",
                "answer": f"'{word}' has {count} '{letter}'.\n#### {count}",
                "word": word,
                "letter": letter,
            }
        )
    return items


# ----------------------------------------------------------------------------------------------
# prompts and answer checking


def mc_message(question: str, choices: Sequence[str]) -> str:
    """nanochat's multiple-choice user message."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(LETTERS, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def prompt_ids(tok: Any, user: str) -> list[int]:
    return render_for_completion(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": ""}])


_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def final_number(text: str) -> Optional[str]:
    """The number after `#### ` (commas removed), as GSM8K writes its answers."""
    m = _ANSWER.search(text)
    return m.group(1).replace(",", "").rstrip(".") if m else None


def humaneval_program(row: dict, completion: str) -> str:
    """The prompt's imports, the completion's code (its first fenced block, or all of it), the
    tests and the call of `check`."""
    imports = []
    for line in row["prompt"].splitlines():
        if line.startswith(("import ", "from ")):
            imports.append(line)
    m = re.search(r"```(?:python)?\s*\n(.*?)```", completion, re.DOTALL)
    code = m.group(1) if m else completion
    return "\n".join(imports) + "\n\n" + code + "\n\n" + row["test"] + "\n" + f"check({row['entry_point']})\n"


# ----------------------------------------------------------------------------------------------
# scoring


@dataclass
class ChatResult:
    task: str
    accuracy: float
    examples: int
    per_example: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    passes: list[int] = field(default_factory=list)  # generative: samples that passed, per example
    samples: int = 0  # generative: samples per example (0: categorical)

    @classmethod
    def of(cls, task: str, credit: list[float], passes: list[int], samples: int) -> ChatResult:
        """Accuracy (and pass@k for k = 1..samples when generative) from per-example results."""
        n = len(credit)
        accuracy = sum(credit) / n if n else float("nan")
        extra = {}
        if samples and n:
            extra = {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in passes) / n for k in range(1, samples + 1)}
        return cls(task, accuracy, n, list(credit), extra, list(passes), samples)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "examples": self.examples, **self.extra}


def evaluate_categorical(
    model: Any, tok: Any, task: str, rows: Sequence[dict], batch_size: int = 32, max_batch_tokens: int = 16384
) -> ChatResult:
    """Argmax over the choice letters' logits after `<|assistant_start|>`, many prompts per pass."""
    letter_ids = []
    for letter in LETTERS:
        ids = tok.encode(letter)
        if len(ids) != 1:
            raise DataError(f"the tokenizer encodes the choice letter {letter!r} as {len(ids)} tokens, not one")
        letter_ids.append(ids[0])
    prompts = [prompt_ids(tok, mc_message(r["question"], r["choices"])) for r in rows]
    logits = last_position_logits(model, prompts, tok.bos_id, batch_size, max_batch_tokens)
    credit = []
    for row, lg in zip(rows, logits):
        allowed = letter_ids[: len(row["choices"])]
        # the highest letter logit wins; ties share the credit, as CORE's lowest losses do
        credit.append(tie_credit([-float(x) for x in lg[allowed]], int(row["answer"])))
    return ChatResult.of(task, credit, [], 0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def evaluate_generative(
    model: Any,
    tok: Any,
    task: str,
    rows: Sequence[dict],
    generate: Callable[[list[list[int]]], list[list[int]]],
    num_samples: int = 1,
    run_programs: Optional[Callable[[list[str]], list[bool]]] = None,
    chunk: int = 256,
) -> ChatResult:
    """Sample num_samples answers per row (`generate`: prompts -> new tokens), check each; a row
    passes if any sample does. pass@k for k = 1..num_samples is reported too."""
    if task == "humaneval":
        prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
    else:
        prompts = [prompt_ids(tok, r["question"]) for r in rows]
    flat = [p for p in prompts for _ in range(num_samples)]
    completions: list[str] = []
    for at in range(0, len(flat), chunk):  # a progress line per chunk: generation is the slow part
        completions += [tok.decode(ids) for ids in generate(flat[at : at + chunk])]
        if len(flat) > chunk:
            log.info("%s: %d/%d answers generated", task, len(completions), len(flat))
    if task == "humaneval":
        if run_programs is None:
            raise ValueError("humaneval needs run_programs (the sandbox)")
        programs = [humaneval_program(rows[j // num_samples], c) for j, c in enumerate(completions)]
        passed = run_programs(programs)
    else:
        passed = [
            final_number(c) is not None and final_number(c) == final_number(rows[j // num_samples]["answer"])
            for j, c in enumerate(completions)
        ]
    per_row = [passed[i * num_samples : (i + 1) * num_samples] for i in range(len(rows))]
    credit = [1.0 if any(p) else 0.0 for p in per_row]
    return ChatResult.of(task, credit, [sum(p) for p in per_row], num_samples)


def generator_for(model: Any, tok: Any, suite: Any, seed: int) -> Callable[[list[list[int]]], list[list[int]]]:
    """prompts -> new tokens with the suite's sampling settings (`eval.*`), batched, with tool
    calls, stopping at `<|assistant_end|>` or BOS. chatlm's GPT runs on the KV-cache engine; a
    model without a cache interface (a test oracle) is re-forwarded whole at every step."""
    from chatlm.engine.tools import ToolTokens

    stop = [tok.encode_special("<|assistant_end|>"), tok.bos_id]
    if hasattr(model, "final_hidden") and hasattr(model, "dims"):
        from chatlm.engine.generate import generate

        return lambda prompts: generate(
            model,
            prompts,
            suite.max_new_tokens,
            temperature=suite.temperature,
            top_k=suite.top_k or None,
            seed=seed,
            stop_ids=stop,
            tools=ToolTokens(tok),
            batch_size=suite.batch_size,
        )
    from chatlm.engine.padded import generate_padded

    return lambda prompts: generate_padded(
        model,
        prompts,
        tok.bos_id,
        suite.max_new_tokens,
        temperature=suite.temperature,
        top_k=suite.top_k or None,
        seed=seed,
        stop_ids=stop,
        tools=ToolTokens(tok),
        batch_size=suite.batch_size,
    )


def sandbox_for(suite: Any) -> Callable[[list[str]], list[bool]]:
    """programs -> passed, run in the sandbox with the suite's timeout and parallelism."""
    from chatlm.evals.sandbox import SandboxLimits, run_many

    limits = SandboxLimits(timeout_s=suite.sandbox_timeout_s)
    return lambda programs: [r.passed for r in run_many(programs, limits, workers=suite.sandbox_workers)]


def evaluate_task(
    model: Any, tok: Any, task: str, rows: Sequence[dict], suite: Any, seed: int, tokens: int, ctx: Any = None
) -> ChatResult:
    """One chat task with a suite's settings (`EvalSuiteConfig`): the eval stage and training
    both score through here. With several ranks each scores every world_size-th example and the
    per-example results are gathered, so every rank returns the whole task's result."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    mine = list(rows[rank::world])
    samples = 0 if task in CATEGORICAL else suite.num_samples
    if not mine:
        result = ChatResult.of(task, [], [], samples)
    elif task in CATEGORICAL:
        result = evaluate_categorical(model, tok, task, mine, suite.batch_size, tokens)
    else:
        run_programs = sandbox_for(suite) if task == "humaneval" else None
        generate = generator_for(model, tok, suite, seed + rank)
        result = evaluate_generative(model, tok, task, mine, generate, suite.num_samples, run_programs)
    if world > 1:
        credit, passes = [0.0] * len(rows), [0] * len(rows)
        for r, (c, p) in enumerate(ctx.all_gather_object((result.per_example, result.passes))):
            for j, value in enumerate(c):
                credit[r + j * world] = value
            for j, value in enumerate(p):
                passes[r + j * world] = value
        result = ChatResult.of(task, credit, passes if samples else [], samples)
    log.info("%s: accuracy %.4f (%d examples)", task, result.accuracy, result.examples)
    return result


def chatcore(accuracies: dict[str, float], complete: bool) -> Optional[float]:
    """Mean centred accuracy over nanochat's five tasks, or None unless all were scored in full."""
    if not complete or any(t not in accuracies for t in CHATCORE_TASKS):
        return None
    return sum((accuracies[t] - BASELINES[t]) / (1 - BASELINES[t]) for t in CHATCORE_TASKS) / len(CHATCORE_TASKS)
