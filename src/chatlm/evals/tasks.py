"""Which evaluation data may never be trained on.

Every split the evaluators read is registered here as eval-only: the chat sets (the test splits
of ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval, as `chatlm fetch evals` writes them), the
SpellingBee items (seeds `SPELLING_BEE_SEED + i`; training items must come from other seeds) and
every CORE task. The SFT mixture builder calls `refuse_eval_only` on each of its sources, so a
mixture that names one of them, by task name or by file, stops with one line before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from chatlm.errors import ConfigError
from chatlm.evals.chat import CATEGORICAL, GENERATIVE, SPELLING_BEE_SEED
from chatlm.evals.core import CORE_LABELS


@dataclass(frozen=True)
class TaskSplit:
    task: str  # the name in eval.tasks, or the CORE label
    split: str  # the split the evaluator reads
    eval_only: bool  # scored by chatlm.eval: never a training source
    file: Optional[str]  # its path under the evals data directory (None: generated)


SPLITS: tuple[TaskSplit, ...] = (
    TaskSplit("arc_easy", "test", True, "chat/arc_easy.jsonl"),
    TaskSplit("arc_challenge", "test", True, "chat/arc_challenge.jsonl"),
    TaskSplit("mmlu", "test", True, "chat/mmlu.jsonl"),
    TaskSplit("gsm8k", "test", True, "chat/gsm8k.jsonl"),
    TaskSplit("humaneval", "test", True, "chat/humaneval.jsonl"),
    TaskSplit("spelling_bee", f"seeds {SPELLING_BEE_SEED}..", True, None),
    *(TaskSplit(label, "eval", True, None) for label in CORE_LABELS),
)
assert {s.task for s in SPLITS} >= set(CATEGORICAL + GENERATIVE)


def eval_only_split(source: str) -> Optional[TaskSplit]:
    """The registered eval-only split a source names (a task name, or a path ending in one of
    the evaluators' files, or any file under an eval bundle's `core/eval_data/`), else None."""
    name = source.strip().lower().replace("-", "_")
    for split in SPLITS:
        if split.eval_only and name == split.task:
            return split
    # the path as written, and where it really is (a symlink to, or a `..` path into, eval data)
    given = Path(source).expanduser()
    paths = {given.as_posix()}
    try:
        paths.add(given.resolve().as_posix())
    except (OSError, RuntimeError):
        pass
    for path in paths:
        for split in SPLITS:
            if split.eval_only and split.file and path.endswith(split.file):
                return split
        if "/core/eval_data/" in path or path.startswith("core/eval_data/"):
            return TaskSplit(Path(path).stem, "eval", True, path)
    return None


def refuse_eval_only(source: str, key: str) -> None:
    """ConfigError (naming `key`) when `source` is evaluation data: training on it would make
    every later score of that task meaningless."""
    split = eval_only_split(source)
    if split is not None:
        raise ConfigError(
            key,
            f"{source!r} is {split.task}'s {split.split} split, which chatlm.eval scores: "
            "train on other data (evaluation splits are never training sources)",
        )
