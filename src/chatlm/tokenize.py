"""`python -m chatlm.tokenize`: train the BPE tokenizer (nanochat's tok_train and tok_eval).

Reads the train shards of every configured data source (never the validation shard), trains a
byte-level BPE with rustbpe to `tokenizer.vocab_size` ids, saves it to
`<paths.tokenizer_dir>/<tokenizer.name>` and reports its compression (bytes per token) on held-out
validation documents, next to GPT-2's and GPT-4's tokenizers when their vocabulary files are
available offline (tiktoken's cache, TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import json
import logging
from itertools import islice

from chatlm.config import TokenizeConfig
from chatlm.data.shards import iter_documents, list_shards
from chatlm.data.sources import prepare_source
from chatlm.errors import ChatlmError
from chatlm.hydra.app import run_stage
from chatlm.runtime.rundir import Run
from chatlm.tokenizer import Tokenizer, compression_report, reference_encoding, tokenizer_dir, train_tokenizer
from chatlm.tokenizer.training_text import training_texts

log = logging.getLogger("chatlm")


class _TenPercentSteps(logging.Filter):
    """rustbpe reports every 1% of merges: keep every 10th of those lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Progress: ") and "%" in message:
            return message.split("%", 1)[0].removeprefix("Progress: ").strip().endswith("0")
        return True


def tokenize(cfg: TokenizeConfig, run: Run) -> dict:
    out = tokenizer_dir(cfg.tokenizer, cfg.paths)
    if (out / "tokenizer.json").exists() and not cfg.overwrite:
        raise ChatlmError(
            f"a tokenizer already exists at {out}; pass overwrite=true to replace it, or choose another tokenizer.name"
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

    progress = _TenPercentSteps()
    logging.getLogger("rustbpe").addFilter(progress)
    try:
        tok = train_tokenizer(training_texts(train_sets, cfg.tokenizer.max_chars), cfg.tokenizer)
    finally:
        logging.getLogger("rustbpe").removeFilter(progress)
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
    report = {
        "tokenizer": {"name": tok.name, "dir": str(out), "vocab_size": tok.vocab_size, **tok.meta},
        "compression": {"chatlm": compression_report(Tokenizer.load(out), held_out)},
    }
    for ref in ("r50k_base", "cl100k_base"):
        enc = reference_encoding(ref)
        report["compression"][ref] = compression_report(enc, held_out) if enc is not None else None
    (run.path / "tokenizer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{'tokenizer':<12} {'vocab':>7}  " + "  ".join(f"{n:>14}" for n in held_out)]
    for name, rep in report["compression"].items():
        if rep is None:
            lines.append(f"{name:<12} {'':>7}  (vocab file not available offline)")
            continue
        vocab = tok.vocab_size if name == "chatlm" else {"r50k_base": 50257, "cl100k_base": 100277}[name]
        cells = "  ".join(f"{rep['per_text'][n]['bytes_per_token']:>10.3f} B/t" for n in held_out)
        lines.append(f"{name:<12} {vocab:>7}  {cells}")
    log.info("compression on held-out validation text (bytes per token, higher is better):\n%s", "\n".join(lines))
    run.record_derived(tokenizer_dir=str(out), vocab_size=tok.vocab_size)
    chatlm_bpt = report["compression"]["chatlm"]["bytes_per_token"]
    return {
        "vocab_size": tok.vocab_size,
        "train_chars": tok.meta["train_chars"],
        "train_docs": tok.meta["train_docs"],
        "train_seconds": tok.meta["train_seconds"],
        "bytes_per_token": round(chatlm_bpt, 4),
        "tokenizer_dir": str(out),
    }


def main() -> None:
    run_stage("tokenize", tokenize)


if __name__ == "__main__":
    main()
