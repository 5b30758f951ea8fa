"""Scaling efficiency from `chatlm.bench` results on 1, 2, 4, ... GPUs: for each configuration
(model, precision, attention backend, device batch, tokens per step), tok/s on N GPUs over
N x tok/s on one. The files may come from several device calls (an 8-GPU sweep of d24 in bf16 and
fp8 does not fit in one call's 10 minutes).

usage: python launch/gpu/scaling_summary.py [--json OUT.json] bench_01.json bench_02.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def config_key(r: dict) -> tuple:
    """What must match for two results to be one configuration at different GPU counts."""
    return (
        r["model"],
        r["dtype"] + ("+fp8" if r["fp8"] else ""),
        r["attention_backend"],
        r["device_batch_size"],
        r["tokens_per_step"],
        r.get("device_name", ""),
    )


def scaling_table(results: list[dict]) -> list[dict]:
    """One row per (configuration, GPU count); `efficiency` is None without a 1-GPU result of
    the same configuration. Of repeated results the last one counts."""
    by_key: dict[tuple, dict[int, dict]] = {}
    for r in results:
        if r.get("task") != "train":
            continue
        by_key.setdefault(config_key(r), {})[int(r["world_size"])] = r
    rows = []
    for key, by_n in by_key.items():
        base = by_n.get(1)
        for n in sorted(by_n):
            tps = float(by_n[n]["tok_per_s"])
            rows.append(
                {
                    "model": key[0],
                    "precision": key[1],
                    "attention": key[2],
                    "device_batch_size": key[3],
                    "tokens_per_step": key[4],
                    "device_name": key[5],
                    "gpus": n,
                    "tok_per_s": tps,
                    "tok_per_s_per_gpu": tps / n,
                    "median_step_s": by_n[n]["median_step_s"],
                    "efficiency": tps / (n * float(base["tok_per_s"])) if base else None,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = scaling_table([json.loads(f.read_text()) for f in args.files])
    for row in rows:
        eff = "n/a (no 1-GPU run)" if row["efficiency"] is None else f"{row['efficiency']:.3f}"
        print(
            f"{row['model']} {row['precision']} {row['attention']} B={row['device_batch_size']}: "
            f"{row['gpus']} GPU(s) {row['tok_per_s']:,.0f} tok/s ({row['tok_per_s_per_gpu']:,.0f} per GPU, "
            f"{1000 * row['median_step_s']:.1f} ms/step), scaling efficiency {eff}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
