"""Where a model came from: the chain tokenizer -> base -> sft -> rl.

Every checkpoint's meta.json holds `lineage`, the list of what its weights were built from, oldest
first: the tokenizer (name, vocabulary size, fingerprint), then each checkpoint a later stage
started from (stage, run directory, checkpoint, step, config hash). A stage that starts from a
checkpoint extends that checkpoint's chain by the checkpoint itself (`extend`) and writes the
result into its own checkpoints' meta and into run.json (`lineage`), where `chatlm runs show`
prints it (`describe`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def tokenizer_entry(record: Optional[dict]) -> Optional[dict]:
    """The tokenizer link of a chain, from a checkpoint's `tokenizer` record (None if it has none)."""
    if not isinstance(record, dict) or not record.get("name"):
        return None
    return {
        "stage": "tokenizer",
        "name": record.get("name"),
        "vocab_size": record.get("vocab_size"),
        "fingerprint": record.get("sha256"),
        "path": record.get("path"),
    }


def checkpoint_entry(step_dir: Path, meta: dict) -> dict:
    """The link for checkpoint `step_dir` (`<run>/checkpoints/step_<N>`) with meta.json `meta`."""
    step_dir = Path(step_dir)
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir
    return {
        "stage": meta.get("stage", "train"),
        "run_dir": str(run_dir),
        "checkpoint": str(step_dir),
        "step": meta.get("step"),
        "config_hash": meta.get("config_hash"),
    }


def chain_of(meta: dict) -> list[dict]:
    """The chain recorded in a checkpoint's meta; for checkpoints written before chains were kept,
    just its tokenizer."""
    chain = meta.get("lineage")
    if isinstance(chain, list) and chain:
        return [dict(link) for link in chain if isinstance(link, dict)]
    tok = tokenizer_entry(meta.get("tokenizer"))
    return [tok] if tok else []


def extend(step_dir: Path, meta: dict) -> list[dict]:
    """The chain of a model that starts from checkpoint `step_dir`: its chain, then the checkpoint."""
    return [*chain_of(meta), checkpoint_entry(step_dir, meta)]


def fresh(tokenizer_record: Optional[dict]) -> list[dict]:
    """The chain of a model trained from scratch: only its tokenizer."""
    tok = tokenizer_entry(tokenizer_record)
    return [tok] if tok else []


def describe(chain: Any, this: str = "this run") -> list[str]:
    """One line per link, oldest first, ending with `this`."""
    lines = []
    for link in chain if isinstance(chain, list) else []:
        if not isinstance(link, dict):
            continue
        if link.get("stage") == "tokenizer":
            fp = str(link.get("fingerprint") or "")[:12]
            lines.append(f"tokenizer {link.get('name')} ({link.get('vocab_size')} ids, fingerprint {fp})")
        else:
            cfg = str(link.get("config_hash") or "")[:12]
            lines.append(f"{link.get('stage')} {link.get('checkpoint')} (step {link.get('step')}, config {cfg})")
    return [*lines, this]
