"""Parquet shards shaped like web text (ClimbMix/FineWeb): 1,000 documents per row group, document
lengths log-normal around 2,000 characters, cut from the embedded corpus (launch/bench_loader.py's
`synthetic_shards`). The embedded corpus itself has 25 long documents per row group, so it cannot show
what a 1,000-document refill costs a training step.

    python3 launch/gpu/web_like_shards.py OUT_DIR [N_DOCS]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launch/
from bench_loader import embedded_shards, synthetic_shards  # noqa: E402

from chatlm.data.shards import iter_documents, list_shards  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    n_docs = int(sys.argv[2]) if len(sys.argv) > 2 else 24_000
    emb, _ = embedded_shards(out)
    text = "\n\n".join(iter_documents(emb))
    synthetic_shards(out, text, n_docs, seed=0)
    train, val = list_shards(out / "synthetic")
    print(f"{len(train)} train shards + 1 val in {out / 'synthetic'} ({n_docs} documents, 1,000 per row group)")


if __name__ == "__main__":
    main()
