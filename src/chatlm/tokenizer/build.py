"""Training a tokenizer from config (`python -m chatlm.tokenize`, and `auto_tokenizer=true` in
training): read the train shards, train the BPE with one progress display, save it, and report its
compression on held-out validation text next to GPT-2's and GPT-4's tokenizers (when their
vocabulary files are available offline)."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path
from typing import Any

from chatlm.data.shards import iter_documents, list_shards
from chatlm.data.sources import prepare_source
from chatlm.errors import ChatlmError
from chatlm.runtime.sinks import ProgressReporter
from chatlm.tokenizer.bpe import Tokenizer, compression_report, reference_encoding, tokenizer_dir, train_tokenizer
from chatlm.tokenizer.training_text import training_texts

log = logging.getLogger("chatlm")


class _MergeProgress(logging.Filter):
    """rustbpe logs "Progress: N% ..." for every 1 % of the merges: show them as one progress bar
    (a line every 25 % where there is no terminal) instead of 100 lines."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = ProgressReporter(100, description="tokenizer merges", every_steps=25, every_seconds=1e9)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Progress: ") and "%" in message:
            try:
                self.bar.update(int(float(message.split("%", 1)[0].removeprefix("Progress: ").strip())))
            except ValueError:
                return True
            return False
        return True


def train_with_progress(texts: Any, tokenizer_cfg: Any) -> Tokenizer:
    """`train_tokenizer` with rustbpe's progress shown as one bar."""
    progress = _MergeProgress()
    logging.getLogger("rustbpe").addFilter(progress)
    try:
        return train_tokenizer(texts, tokenizer_cfg)
    finally:
        logging.getLogger("rustbpe").removeFilter(progress)
        progress.bar.close()


def compression_table(tok: Tokenizer, out: Path, held_out: dict[str, str]) -> tuple[dict, str]:
    """(report, table): bytes per token of this tokenizer and the reference ones on held-out text."""
    report = {
        "tokenizer": {"name": tok.name, "dir": str(out), "vocab_size": tok.vocab_size, **tok.meta},
        "compression": {"chatlm": compression_report(Tokenizer.load(out), held_out)},
    }
    for ref in ("r50k_base", "cl100k_base"):
        enc = reference_encoding(ref)
        report["compression"][ref] = compression_report(enc, held_out) if enc is not None else None
    lines = [f"{'tokenizer':<12} {'vocab':>7}  " + "  ".join(f"{n:>14}" for n in held_out)]
    for name, rep in report["compression"].items():
        if rep is None:
            lines.append(f"{name:<12} {'':>7}  (vocab file not available offline)")
            continue
        vocab = tok.vocab_size if name == "chatlm" else {"r50k_base": 50257, "cl100k_base": 100277}[name]
        cells = "  ".join(f"{rep['per_text'][n]['bytes_per_token']:>10.3f} B/t" for n in held_out)
        lines.append(f"{name:<12} {vocab:>7}  {cells}")
    return report, "\n".join(lines)


def build_tokenizer(cfg: Any, run: Any) -> dict:
    """The tokenize stage: train `cfg.tokenizer` on `cfg.data`'s train shards, save and report it."""
    out = tokenizer_dir(cfg.tokenizer, cfg.paths)
    exists = (out / "tokenizer.json").exists()
    if exists and not cfg.overwrite and not cfg.reuse:
        raise ChatlmError(
            f"a tokenizer already exists at {out}; pass reuse=true to keep it, overwrite=true to replace it, "
            "or choose another tokenizer.name"
        )
    train_sets, val_files = [], []
    for source in cfg.data.sources:
        directory = prepare_source(source, cfg.paths, rank_is_main=True)
        train, val = list_shards(directory)
        train_sets.append((train, source.weight))
        val_files.append((source.kind.value, val))
        log.info(
            "source %s: %d train shards in %s (validation shard held out)", source.kind.value, len(train), directory
        )
    if exists and cfg.reuse and not cfg.overwrite:
        tok = Tokenizer.load(out)
        log.info(
            "kept the existing tokenizer %s (%d ids, fingerprint %s): reuse=true",
            out,
            tok.vocab_size,
            tok.fingerprint[:12],
        )
    else:
        tok = train_with_progress(training_texts(train_sets, cfg.tokenizer.max_chars), cfg.tokenizer)
        tok.meta.update(data=cfg.data.name, sources=[s.kind.value for s in cfg.data.sources])
        tok.save(out)
        log.info(
            "trained %s: %d ids (%d merges) on %s chars in %.1f s -> %s",
            tok.name,
            tok.vocab_size,
            tok.n_mergeable - 256,
            f"{tok.meta['train_chars']:,}",
            tok.meta["train_seconds"],
            out,
        )
    held_out = {name: "\n".join(islice(iter_documents([val]), cfg.eval_docs)) for name, val in val_files}
    report, table = compression_table(tok, out, held_out)
    (run.path / "tokenizer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("compression on held-out validation text (bytes per token, higher is better):\n%s", table)
    run.record_derived(tokenizer_dir=str(out), vocab_size=tok.vocab_size)
    return {
        "vocab_size": tok.vocab_size,
        "train_chars": tok.meta.get("train_chars"),
        "train_docs": tok.meta.get("train_docs"),
        "train_seconds": tok.meta.get("train_seconds"),
        "reused": bool(exists and cfg.reuse and not cfg.overwrite),
        "fingerprint": tok.fingerprint,
        "bytes_per_token": round(report["compression"]["chatlm"]["bytes_per_token"], 4),
        "tokenizer_dir": str(out),
    }
