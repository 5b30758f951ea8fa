"""Benchmark the pretraining loader: packed tokens/s including parquet reading and tokenization.

    python launch/bench_loader.py out.json [--threads 1 2] [--seq-len 2048] [--batch-size 32]
        [--seconds 10] [--work-dir /tmp/chatlm_bench_loader] [--tokenizer-dir DIR]

Pin it to cores from outside, e.g. `taskset -c 0 ... --threads 1` for the per-core number.

Two shard sets are measured:
- `embedded`: the corpus shipped in the package, built into shards with `prepare_source` (the
  same code path as `data=embedded`);
- `synthetic`: parquet shards of realistic document lengths (log-normal, median 2,000 characters,
  σ 1.0, capped at 100,000; with bpe32k about 420 tokens at the median, 690 on average, 6 % of
  documents longer than a 2,049-token row) cut from random offsets of the embedded text, 1,000
  documents per row group like nanochat's web shards.

The tokenizer is loaded from `--tokenizer-dir` if it holds one; otherwise a 32K BPE (`bpe32k`)
is trained on the embedded train shards and the training is timed. For every (shard set,
threads) pair the loader (B x T, buffer 1,000) is warmed up (the document buffer fills and the
waste settles a little) and then timed over `--seconds`: tokens/s counts the B*T input tokens of
every batch handed out; waste = cropped tokens / tokens taken from documents in the timed window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from chatlm.config import DataSourceConfig, PathsConfig, TokenizerConfig  # noqa: E402
from chatlm.data.loader import PretrainLoader  # noqa: E402
from chatlm.data.shards import iter_documents, list_shards, write_shards  # noqa: E402
from chatlm.data.sources import prepare_source  # noqa: E402
from chatlm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def embedded_shards(work: Path) -> tuple[list[Path], float]:
    t0 = time.perf_counter()
    directory = prepare_source(DataSourceConfig(), PathsConfig(data_dir=str(work / "data")))
    return list_shards(directory)[0], time.perf_counter() - t0


def synthetic_shards(work: Path, text: str, n_docs: int, seed: int) -> list[Path]:
    out = work / "synthetic"
    if out.is_dir():
        train, _ = list_shards(out)
        return train
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(2000), 1.0, size=n_docs), 50, 100_000).astype(np.int64)
    starts = rng.integers(0, len(text) - 100_000, size=n_docs)
    docs = (text[s : s + n] for s, n in zip(starts, lengths))
    write_shards(docs, out, docs_per_row_group=1000, row_groups_per_shard=4)
    return list_shards(out)[0]


def get_tokenizer(args, train_files: list[Path]) -> tuple[Tokenizer, dict]:
    directory = Path(args.tokenizer_dir or args.work_dir / "tokenizer").expanduser()
    if (directory / "tokenizer.json").exists():
        return Tokenizer.load(directory), {"tokenizer": str(directory), "trained_here": False}
    cfg = TokenizerConfig(name="bpe32k", vocab_size=32768)
    texts = list(iter_documents(train_files))
    chars = sum(len(t) for t in texts)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, cfg)
    seconds = time.perf_counter() - t0
    tok.save(directory)
    # train_chars: what the trainer saw (each document capped at cfg.doc_cap characters, as in nanochat)
    return tok, {
        "tokenizer": str(directory),
        "trained_here": True,
        "train_seconds": round(seconds, 2),
        "rustbpe_seconds": tok.meta.get("train_seconds"),
        "train_docs": tok.meta.get("train_docs"),
        "train_chars": tok.meta.get("train_chars"),
        "doc_cap": cfg.doc_cap,
        "corpus_chars": chars,
        "vocab_size": tok.vocab_size,
    }


def bench(files: list[Path], tok: Tokenizer, B: int, T: int, threads: int, seconds: float, warmup: int) -> dict:
    loader = PretrainLoader(files, tok, B, T, threads=threads, buffer_size=1000)
    for _ in range(warmup):
        loader.next_batch()
    before = loader.packer.stats()
    n = 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    while True:
        loader.next_batch()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu = time.process_time() - cpu0
    after = loader.packer.stats()
    out_tok = after["tokens_out"] - before["tokens_out"]
    cropped = after["tokens_cropped"] - before["tokens_cropped"]
    return {
        "threads": threads,
        "batches": n,
        "seconds": round(elapsed, 3),
        "cpu_seconds": round(cpu, 3),
        "tokens_per_s": B * T * n / elapsed,
        "waste": cropped / (out_tok + cropped),
        "epochs": loader.epoch,
        "row_groups_read": loader.row_groups_read,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON results file")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=5, help="batches before the clock starts")
    p.add_argument("--synthetic-docs", type=int, default=12_000)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/chatlm_bench_loader"))
    p.add_argument(
        "--tokenizer-dir",
        default=None,
        help="load this tokenizer (default: <work-dir>/tokenizer, "
        "trained there as bpe32k on the embedded corpus if missing)",
    )
    p.add_argument("--sets", nargs="+", default=["embedded", "synthetic"])
    args = p.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    emb_files, emb_seconds = embedded_shards(args.work_dir)
    tok, tok_info = get_tokenizer(args, emb_files)
    sets = {"embedded": emb_files}
    if "synthetic" in args.sets:
        text = "\n\n".join(iter_documents(emb_files))
        sets["synthetic"] = synthetic_shards(args.work_dir, text, args.synthetic_docs, seed=0)
    results = []
    for name in args.sets:
        files = sets[name]
        for threads in args.threads:
            r = {
                "set": name,
                "shards": len(files),
                **bench(files, tok, args.batch_size, args.seq_len, threads, args.seconds, args.warmup),
            }
            results.append(r)
            print(
                f"  {name:10s} threads={threads}: {r['tokens_per_s'] / 1e6:.3f} M tok/s, waste "
                f"{100 * r['waste']:.1f} %",
                flush=True,
            )

    print(
        f"\nloader, B={args.batch_size} T={args.seq_len}, buffer 1000, tokenizer {tok.name} "
        f"(vocab {tok.vocab_size}), CPUs allowed: {len(os.sched_getaffinity(0))}"
    )
    print("| shard set | threads | tokens/s | CPU s / wall s | waste |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['set']} | {r['threads']} | {r['tokens_per_s'] / 1e6:.2f} M | "
            f"{r['cpu_seconds'] / r['seconds']:.2f} | {100 * r['waste']:.1f} % |"
        )
    if tok_info.get("trained_here"):
        print(
            f"tokenizer training (bpe32k on the embedded train shards: {tok_info['train_docs']} docs, "
            f"{tok_info['train_chars'] / 1e6:.1f} M chars after the {tok_info['doc_cap']:,}-char cap per document, "
            f"of {tok_info['corpus_chars'] / 1e6:.1f} M): {tok_info['train_seconds']:.1f} s"
        )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "embedded_prepare_seconds": round(emb_seconds, 2),
        "tokenizer": tok_info,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
