"""Benchmark the BOS best-fit packer on one core: tokens/s and token waste.

    python launch/bench_packing.py [out.json] [--seq-len 2048] [--rows 10000] [--buffer 1000]

Documents are synthetic but shaped like web text after tokenization: log-normal lengths (median
~450 tokens, long tail, capped at 20k) with BOS in front, arriving as Python lists in chunks of
128 like tiktoken's batch encoder returns them. The clock covers everything the packer does per
row, including converting the incoming lists to arrays. Waste = cropped tokens / tokens taken
from documents (nanochat measured ~35% for best-fit-crop at T=2048 on its data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from chatlm.data.packing import BestFitPacker, ConversationPacker  # noqa: E402

BOS = 32759


def make_docs(n: int, rng: np.random.Generator, median: float, sigma: float, cap: int) -> list[list[int]]:
    lengths = np.clip(rng.lognormal(np.log(median), sigma, size=n).astype(np.int64), 1, cap)
    # small ids are interned by CPython, which keeps the pool of Python lists small in memory
    flat = rng.integers(0, 256, size=int(lengths.sum()), dtype=np.int64)
    docs, start = [], 0
    for n_tok in lengths:
        doc = flat[start : start + n_tok].tolist()
        doc[0] = BOS
        docs.append(doc)
        start += n_tok
    return docs


def doc_chunks(pool: list[list[int]], rng: np.random.Generator, chunk: int = 128):
    """Endless chunks of documents drawn from a pool (in a fresh random order each pass)."""
    while True:
        order = rng.permutation(len(pool))
        for i in range(0, len(order) - chunk + 1, chunk):
            yield [pool[j] for j in order[i : i + chunk]]


def bench_pretrain(
    seq_len: int, rows: int, warmup_rows: int, buffer_size: int, median: float, sigma: float, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    capacity = seq_len + 1
    pool = make_docs(20_000, rng, median=median, sigma=sigma, cap=20_000)
    source = doc_chunks(pool, rng)
    packer = BestFitPacker(bos_id=BOS, buffer_size=buffer_size)
    out = np.empty(capacity, dtype=np.int32)
    # Long documents only leave the buffer when they are the shortest candidate, so they pile up
    # and the waste climbs for a while: warm up to the steady state before measuring.
    for _ in range(warmup_rows):
        packer.pack_row(capacity, refill=lambda: next(source), out=out)
    before = packer.stats()
    t0 = time.perf_counter()
    for _ in range(rows):
        packer.pack_row(capacity, refill=lambda: next(source), out=out)
    seconds = time.perf_counter() - t0
    after = packer.stats()
    tokens_out = after["tokens_out"] - before["tokens_out"]
    cropped = after["tokens_cropped"] - before["tokens_cropped"]
    return {
        "seq_len": seq_len,
        "rows": rows,
        "warmup_rows": warmup_rows,
        "buffer_size": buffer_size,
        "doc_len_lognormal_median": median,
        "doc_len_lognormal_sigma": sigma,
        "mean_doc_len": float(np.mean([len(d) for d in pool])),
        "frac_docs_longer_than_row": float(np.mean([len(d) > capacity for d in pool])),
        "seconds": seconds,
        "tokens_per_s": tokens_out / seconds,
        "rows_per_s": rows / seconds,
        "waste_pct": 100.0 * cropped / (tokens_out + cropped),
        "waste_pct_including_warmup": 100.0 * after["waste"],
        "docs_cropped": after["docs_cropped"] - before["docs_cropped"],
        "docs_in": after["docs_in"] - before["docs_in"],
    }


def bench_sft(seq_len: int, rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    capacity = seq_len + 1
    n_convs = 100 + int(rows * capacity / 300) + 200
    convs = make_docs(n_convs, rng, median=300, sigma=0.9, cap=6000)
    masks = [[0] * (len(c) // 2) + [1] * (len(c) - len(c) // 2) for c in convs]
    source = iter(zip(convs, masks))
    packer = ConversationPacker(capacity, pad_id=BOS, buffer_size=100)

    def refill():
        packer.add(*next(source))

    t0 = time.perf_counter()
    for _ in range(rows):
        packer.pack_row(refill=refill)
    seconds = time.perf_counter() - t0
    tokens = rows * capacity
    return {
        "seq_len": seq_len,
        "rows": rows,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "pad_pct": 100.0 * packer.pad_tokens / tokens,
        "convs_truncated": packer.convs_truncated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="write the results as JSON here")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--warmup-rows", type=int, default=20000)
    ap.add_argument("--median", type=float, default=450.0, help="median document length (tokens)")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of document lengths")
    ap.add_argument("--buffer", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pre = bench_pretrain(args.seq_len, args.rows, args.warmup_rows, args.buffer, args.median, args.sigma, args.seed)
    sft = bench_sft(args.seq_len, max(1, args.rows // 4), args.seed)
    print(
        f"pretrain best-fit-crop T={pre['seq_len']} buffer={pre['buffer_size']}: "
        f"{pre['tokens_per_s'] / 1e6:.2f}M tok/s ({pre['rows_per_s']:.0f} rows/s), "
        f"waste {pre['waste_pct']:.1f}% after {pre['warmup_rows']} warm-up rows "
        f"(mean doc {pre['mean_doc_len']:.0f} tokens, {100 * pre['frac_docs_longer_than_row']:.1f}% longer than a row)"
    )
    print(f"sft best-fit-pad T={sft['seq_len']}: {sft['tokens_per_s'] / 1e6:.2f}M tok/s, padding {sft['pad_pct']:.1f}%")
    result = {
        "pretrain": pre,
        "sft": sft,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
