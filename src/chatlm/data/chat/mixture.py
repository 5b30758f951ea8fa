"""An SFT mixture (conf/mixture/): its sources' conversations, a held-out validation slice of
each, repeated by the source's `epochs` and shuffled into one training order.

Deterministic for a seed: the same config gives the same conversations in the same order on every
rank and every run. Every source is checked against the evaluation splits first
(`chatlm.evals.tasks.refuse_eval_only`): a mixture that names one stops before anything is read.

File sources are JSONL, one conversation per line (`{"messages": [...]}`, the chat format of
`chatlm.tokenizer.chat_format`). A malformed record is skipped with a warning naming the file and
line, and counted; the rest of the file is kept.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatlm.config.sft import FETCHED_KINDS
from chatlm.data.chat import generated
from chatlm.data.shards import DataError
from chatlm.errors import ConfigError
from chatlm.evals.tasks import refuse_eval_only
from chatlm.tokenizer.chat_format import conversation_problem

log = logging.getLogger("chatlm")

SHOWN_BAD_RECORDS = 5  # malformed records named one by one in the log (the rest are counted)


@dataclass
class SourceReport:
    name: str
    kind: str
    distinct: int  # conversations read or generated
    val: int  # held out
    train: int  # in one pass, after epochs
    epochs: float
    bad_records: int = 0


@dataclass
class Mixture:
    train: list[dict]  # one pass, shuffled
    val: list[dict]
    reports: list[SourceReport] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [f"mixture: {len(self.train):,} training conversations per pass, {len(self.val):,} held out"]
        for r in self.reports:
            bad = f", {r.bad_records} malformed skipped" if r.bad_records else ""
            lines.append(
                f"  {r.name} ({r.kind}): {r.distinct:,} conversations, {r.val:,} held out, "
                f"{r.train:,} per pass (x{r.epochs:g}){bad}"
            )
        return lines


def read_conversations(path: Path, max_examples: int = -1) -> tuple[list[dict], int]:
    """(conversations, malformed records skipped) of a JSONL file; see the module docstring."""
    if not path.is_file():
        raise DataError(f"{path}: no such conversation file")
    convs: list[dict] = []
    bad = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = conversation_problem(record)
            except json.JSONDecodeError as e:
                problem = f"not JSON ({e.msg})"
            if problem is not None:
                bad += 1
                if bad <= SHOWN_BAD_RECORDS:
                    log.warning("%s:%d: skipped a malformed conversation: %s", path, n, problem)
                continue
            convs.append(record if isinstance(record, dict) else {"messages": record})
            if 0 < max_examples <= len(convs):
                break
    if bad > SHOWN_BAD_RECORDS:
        log.warning("%s: %d malformed conversations skipped in all", path, bad)
    if not convs:
        raise DataError(f"{path}: no usable conversations ({bad} malformed)")
    return convs, bad


def source_path(name: str, source: Any, data_dir: str) -> Path:
    if source.path:
        return Path(source.path).expanduser()
    return Path(data_dir).expanduser() / f"{source.kind}.jsonl"


def source_conversations(name: str, source: Any, cfg: Any, words_dir: str) -> tuple[list[dict], int]:
    """(conversations, malformed records) of one source."""
    seed = cfg.seed + source.seed
    if source.kind == "identity":
        return generated.identity(source.size, seed, source.path), 0
    if source.kind == "arithmetic":
        return generated.arithmetic(source.size, seed), 0
    if source.kind == "spelling":
        from chatlm.evals.chat import load_words

        return generated.spelling(source.size, seed, load_words(words_dir)), 0
    path = source_path(name, source, cfg.data_dir)
    if source.kind in FETCHED_KINDS and not path.is_file():
        raise DataError(
            f"mixture source {name}: {path} is missing: run `chatlm fetch sft --sources {source.kind}` first"
        )
    return read_conversations(path, source.max_examples)


def _content_key(conv: dict) -> str:
    """What a conversation says (its messages), as one string: equal keys train the same tokens."""
    return json.dumps(conv.get("messages"), sort_keys=True, ensure_ascii=False)


def _distinct(order: list[int], keys: list[str], n: int, taken: set[str]) -> list[int]:
    """The first `n` indices of `order` whose conversations differ from each other and from `taken`."""
    picked: list[int] = []
    seen = set(taken)
    for i in order:
        if len(picked) >= n:
            break
        if keys[i] not in seen:
            seen.add(keys[i])
            picked.append(i)
    return picked


def _repeat(convs: list[dict], epochs: float, rng: random.Random) -> list[dict]:
    """`epochs` passes over convs: whole passes, then a random fraction of one more."""
    whole, frac = int(epochs), epochs - int(epochs)
    out = convs * whole
    if frac > 0:
        out += rng.sample(convs, math.ceil(frac * len(convs)))
    return out


def build_mixture(cfg: Any, words_dir: str) -> Mixture:
    """The mixture of `cfg` (a MixtureConfig); `words_dir` is where the evals' word list lives."""
    for name, source in cfg.sources.items():
        key = f"mixture.sources.{name}"
        refuse_eval_only(name, key)
        if source.path:
            refuse_eval_only(str(source.path), f"{key}.path")
    val: list[dict] = []
    val_keys: set[str] = set()
    read = []
    for name, source in sorted(cfg.sources.items()):
        convs, bad = source_conversations(name, source, cfg, words_dir)
        rng = random.Random(f"{cfg.seed}:{name}")
        order = list(range(len(convs)))
        rng.shuffle(order)
        keys = [_content_key(c) for c in convs]
        fresh = set(keys) - val_keys  # what no earlier source holds out; one is left to train on
        n_val = max(0, min(cfg.max_val, int(len(convs) * cfg.val_fraction), len(fresh) - 1))
        held = _distinct(order, keys, n_val, val_keys)
        val += [convs[i] for i in held]
        val_keys.update(keys[i] for i in held)
        read.append((name, source, convs, keys, order, rng, len(held), bad))
    # a held-out conversation is never trained on, also where it recurs (generated duplicates, a
    # file listed twice): training keeps only what no source held out
    train: list[dict] = []
    reports = []
    for name, source, convs, keys, order, rng, n_val, bad in read:
        kept = [convs[i] for i in order if keys[i] not in val_keys]
        repeated = _repeat(kept, source.epochs, rng)
        train += repeated
        reports.append(SourceReport(name, source.kind, len(convs), n_val, len(repeated), source.epochs, bad))
    if not train:
        raise ConfigError("mixture.sources", "the mixture holds no training conversations")
    random.Random(cfg.seed).shuffle(train)
    return Mixture(train, val, reports)
