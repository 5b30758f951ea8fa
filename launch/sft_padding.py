"""How much of an SFT mixture's packed rows is padding, for a tokenizer and sequence length: the
mixture built, rendered and packed exactly as `python -m chatlm.sft` does (one rank), without a
model. Prints a table and writes JSON.

    python launch/sft_padding.py --mixture offline --seq-len 2048 --tokenizer ~/.cache/chatlm/tokenizer/bpe32k
    python launch/sft_padding.py --mixture generated --seq-len 256 --tokenizer ~/.cache/chatlm/tokenizer/bpe8k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixture", default="offline", help="a conf/mixture/ name")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048], help="sequence lengths (rows hold T+1 tokens)")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory (chatlm.tokenize wrote it)")
    ap.add_argument("--buffer", type=int, default=100, help="best-fit buffer (sft buffer_size)")
    ap.add_argument("--cache-dir", default=None, help="CHATLM_CACHE_DIR of the fetched SFT files and the word list")
    ap.add_argument("--out", default="sft_padding.json")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from chatlm.config.sft import MixtureConfig
    from chatlm.config.tree import conf_dir
    from chatlm.data.chat.mixture import build_mixture
    from chatlm.data.chat.rows import padding_fraction, rank_rows, render_all
    from chatlm.hydra import store  # noqa: F401 - the schemas and resolvers
    from chatlm.tokenizer import Tokenizer

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path("~/.cache/chatlm").expanduser()
    over = [f"mixture={args.mixture}", "init_from=x", f"paths.cache_dir={cache}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sft", overrides=over)
    mixture_cfg: MixtureConfig = OmegaConf.to_object(cfg.mixture)  # type: ignore[assignment]
    tok = Tokenizer.load(Path(args.tokenizer).expanduser())
    mixture = build_mixture(mixture_cfg, str(cache / "evals"))
    rows_out = []
    for T in args.seq_len:
        r = render_all(tok, mixture.train, T + 1, mixture_cfg.overlong)
        rows = rank_rows(r, T + 1, args.buffer, 0, 1)
        rows_out.append(
            {
                "seq_len": T,
                "conversations": r.stats.conversations,
                "truncated": r.stats.truncated,
                "dropped": r.stats.dropped,
                "tokens": r.stats.tokens,
                "assistant_tokens": r.stats.trained_tokens,
                "rows": len(rows),
                "padding_fraction": round(padding_fraction(r, rows, T + 1), 4),
                "trained_fraction": round(r.stats.trained_tokens / (len(rows) * (T + 1)), 4),
            }
        )
    print(f"mixture={args.mixture} tokenizer={tok.name} ({tok.vocab_size} ids)")
    print("| T | conversations | truncated | dropped | rows | padding | assistant tokens of all slots |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows_out:
        print(
            f"| {x['seq_len']} | {x['conversations']:,} | {x['truncated']} | {x['dropped']} | {x['rows']:,} | "
            f"{100 * x['padding_fraction']:.1f}% | {100 * x['trained_fraction']:.1f}% |"
        )
    Path(args.out).write_text(json.dumps({"mixture": args.mixture, "tokenizer": tok.name, "rows": rows_out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
