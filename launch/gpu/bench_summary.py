"""One line per bench.json (task=train, attention or loss), for the end of a device call's output.

usage: python launch/gpu/bench_summary.py bench_01.json bench_02.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def line(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    if r["task"] == "train":
        kind = r["dtype"] + ("+fp8" if r["fp8"] else "")
        return [
            f"{path.name}: {r['model']} {r['windows'][:4]} B={r['device_batch_size']} x{r['grad_accum']} "
            f"{r['attention_backend']} {kind} compile={r['compile']} | median {1000 * r['median_step_s']:.1f} ms "
            f"({r['timed_steps']} steps, first {r['first_step_s']:.0f} s) | {r['tok_per_s']:,.0f} tok/s | MFU "
            f"{pct(r['mfu_nominal'])} nominal, {pct(r['mfu_measured'])} of measured "
            f"{(r['ceiling_flops'] or 0) / 1e12:.0f} TFLOP/s | peak {r['peak_mem_gib'] or 0:.1f} GiB"
        ]
    if r["task"] == "loss":
        out = [f"{path.name}: loss head {r['model']} {r['rows']:,} rows x {r['n_embd']} -> {r['padded_vocab_size']:,}"]
        for e in r["results"]:
            errs = ", ".join(f"{k} {e[k]:.1e}" for k in ("loss_diff", "grad_x_rel", "grad_w_rel") if k in e)
            out.append(
                f"  {e['variant']:12s}: fwd+bwd {1000 * e['fwd_bwd_s']:.2f} ms, +"
                f"{e.get('extra_peak_gib') or 0:.2f} GiB peak{', ' + errs if errs else ''}"
            )
        return out
    out = [f"{path.name}: attention {r['model']} B={r['batch']} T={r['seq_len']} H={r['n_head']} D={r['head_dim']}"]
    for e in r["results"]:
        if "fwd_bwd_s" in e:
            err = f"{e['max_abs_err']:.1e}" if "max_abs_err" in e else "n/a"
            out.append(
                f"  {e['backend']:5s} w={e['window']:5d}: fwd {1000 * e['fwd_s']:.3f} ms, fwd+bwd "
                f"{1000 * e['fwd_bwd_s']:.3f} ms ({e['effective_tflops']:.0f} eff. TFLOP/s), err {err}"
            )
        else:
            out.append(f"  {e['backend']:5s} w={e['window']:5d}: {e['error'][:90]}")
    for b, s in r["model_attention_fwd_bwd_s"].items():
        out.append(f"  {b}: all layers, one micro-batch: " + ("n/a" if s is None else f"{1000 * s:.2f} ms"))
    return out


def main(paths: list[str]) -> None:
    for p in paths:
        path = Path(p)
        if not path.exists():
            continue
        try:
            print("\n".join(line(path)))
        except Exception as e:  # a summary must never hide the other results
            print(f"{path.name}: unreadable ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main(sys.argv[1:])
