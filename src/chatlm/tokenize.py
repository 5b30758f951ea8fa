"""`python -m chatlm.tokenize`: train the BPE tokenizer (nanochat's tok_train and tok_eval).

Reads the train shards of every configured data source (never the validation shard), trains a
byte-level BPE with rustbpe to `tokenizer.vocab_size` ids, saves it to
`<paths.tokenizer_dir>/<tokenizer.name>` and reports its compression (bytes per token) on held-out
validation documents (body: chatlm.tokenizer.build.build_tokenizer).
"""

from __future__ import annotations

from chatlm.config import TokenizeConfig
from chatlm.hydra.app import run_stage
from chatlm.runtime.rundir import Run
from chatlm.tokenizer.build import build_tokenizer


def tokenize(cfg: TokenizeConfig, run: Run) -> dict:
    return build_tokenizer(cfg, run)


def main() -> None:
    run_stage("tokenize", tokenize)


if __name__ == "__main__":
    main()
