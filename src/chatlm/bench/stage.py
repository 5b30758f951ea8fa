"""`python -m chatlm.bench task=train|attention|loss|inference ...`: run the task, print its table, write bench.json.

The Hydra edge is `chatlm/bench/__main__.py`; `bench(cfg, run)` is the stage body."""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from chatlm.config import BenchConfig

log = logging.getLogger("chatlm")


def _fmt(value: Optional[float], scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}{suffix}"


def _tflops(value: float) -> str:
    return _fmt(value, 1, 0 if value >= 100 else 3)


def train_rows(r: dict) -> list[tuple[str, str]]:
    ceiling = r.get("ceiling_flops")
    return [
        ("device", f"{r['device_name']} x{r['world_size']} | torch {r['torch']}"),
        (
            "model",
            f"{r['model']} (d{r['depth']}, width {r['n_embd']}, {r['n_head']} heads, {r['windows']}, T={r['seq_len']})",
        ),
        (
            "batch",
            f"{r['tokens_per_step']:,} tokens/step = {r['device_batch_size']} x {r['seq_len']} x "
            f"{r['world_size']} x {r['grad_accum']} accumulation ({r['tokens']} tokens)",
        ),
        (
            "kernels",
            f"attention {r['attention_backend']} | {r['dtype']}"
            + (f" + fp8 ({r['fp8_linears']} linears)" if r["fp8"] else "")
            + f" | compile {r['compile']}",
        ),
        (
            "steps",
            f"{r['timed_steps']} timed of {r['steps']} (first {r['warmup_steps']} left out; step 1 took "
            f"{r['first_step_s']:.1f} s)",
        ),
        (
            "step time",
            f"median {_fmt(r['median_step_s'], 1000)} ms (min {_fmt(r['min_step_s'], 1000)}, "
            f"max {_fmt(r['max_step_s'], 1000)})",
        ),
        (
            "tok/s",
            f"{r['tok_per_s']:,.0f}"
            + (f" ({r['tok_per_s_per_device']:,.0f} per device)" if r["world_size"] > 1 else ""),
        ),
        (
            "MFU vs nominal",
            f"{_fmt(r['mfu_nominal'], 100, 1, ' %')} of {_fmt(r['peak_flops_nominal'], 1e-12, 0)} "
            "TFLOP/s (dense bf16 peak)",
        ),
        (
            "MFU vs measured",
            f"{_fmt(r['mfu_measured'], 100, 1, ' %')} of {_fmt(ceiling, 1e-12, 0)} TFLOP/s"
            + (f" ({r['ceiling_source']})" if r.get("ceiling_source") else " (no ceiling measured)"),
        ),
        (
            "peak memory",
            "n/a (not a CUDA device)"
            if r["peak_mem_gib"] is None
            else f"{r['peak_mem_gib']:.1f} GiB allocated, {r['peak_reserved_gib']:.1f} GiB reserved",
        ),
        ("loss", f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"),
    ] + profile_rows(r.get("profile"))


def profile_rows(p: Optional[dict]) -> list[tuple[str, str]]:
    if not p:
        return []
    rows = [("profile", f"{p['steps']} extra steps: {p['total_ms_per_step']:,.1f} ms of {p['clock']} per step")]
    rows += [
        (f"  {k}", f"{v:,.1f} ms/step ({100 * v / p['total_ms_per_step']:.0f} %)")
        for k, v in p["by_category_ms_per_step"].items()
    ]
    rows += [
        (f"  top {i + 1}", f"{e['ms_per_step']:,.1f} ms/step, {e['calls_per_step']:g} calls: {e['name'][:70]}")
        for i, e in enumerate(p["top"][:5])
    ]
    return rows


def attention_rows(r: dict) -> list[tuple[str, ...]]:
    rows = []
    for e in r["results"]:
        if "fwd_bwd_s" not in e:
            rows.append(
                (e["backend"], str(e["window"]), str(e["layers"]), "-", "-", "-", "-", e["error"].split(":")[0])
            )
            continue
        rows.append(
            (
                e["backend"],
                str(e["window"]),
                str(e["layers"]),
                _fmt(e["fwd_s"], 1000, 3),
                _fmt(e["fwd_bwd_s"], 1000, 3),
                _tflops(e["effective_tflops"]),
                _tflops(e["model_tflops"]),
                f"{e['max_abs_err']:.1e}" if "max_abs_err" in e else "n/a",
            )
        )
    return rows


ATTENTION_HEADER = ("backend", "window", "layers", "fwd ms", "fwd+bwd ms", "eff. TFLOP/s", "model TFLOP/s", "max |err|")


LOSS_HEADER = ("variant", "fwd+bwd ms", "extra peak GiB", "|loss - plain|", "grad x rel. err", "grad W rel. err")


def loss_rows(r: dict) -> list[tuple[str, ...]]:
    rows = []
    for e in r["results"]:

        def err(key: str, e: dict = e) -> str:
            return f"{e[key]:.1e}" if key in e else "-"

        rows.append(
            (
                e["variant"],
                _fmt(e["fwd_bwd_s"], 1000, 3),
                _fmt(e.get("extra_peak_gib"), 1, 2),
                err("loss_diff"),
                err("grad_x_rel"),
                err("grad_w_rel"),
            )
        )
    return rows


INFERENCE_HEADER = (
    "mode",
    "batch",
    "TTFT ms",
    "prefill tok/s",
    "decode tok/s",
    "per seq",
    "step ms",
    "of bound",
    "peak GiB",
)


def inference_rows(r: dict) -> list[tuple[str, ...]]:
    return [
        (
            e["mode"],
            str(e["batch"]),
            _fmt(e["ttft_ms"], 1, 1),
            _fmt(e["prefill_tok_per_s"], 1, 0),
            _fmt(e["decode_tok_per_s"], 1, 0),
            _fmt(e["decode_tok_per_s_per_seq"], 1, 0),
            _fmt(e["median_step_ms"], 1, 2),
            _fmt(e["fraction_of_bound"], 100, 0, " %"),
            _fmt(e["peak_mem_gib"], 1, 2),
        )
        for e in r["results"]
    ]


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    if result["task"] == "train":
        table = Table(title="chatlm bench: train", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        for row in train_rows(result):
            table.add_row(*row)
    elif result["task"] == "inference":
        table = Table(
            title=f"chatlm bench: inference, {result['model']} (d{result['depth']}, {result['dtype']}) on "
            f"{result['device_name']}, {result['prompt_tokens']}-token prompts + {result['new_tokens']} new tokens"
        )
        for col in INFERENCE_HEADER:
            table.add_column(col, justify="left" if col == "mode" else "right")
        for row in inference_rows(result):
            table.add_row(*row)
        table.caption = (
            f"weights {result['weight_bytes'] / 2**20:,.0f} MiB read per step; "
            f"KV {result['kv_read_bytes_mid'] / 2**20:,.1f} MiB per sequence per step at mid generation; "
            "'of bound' = decode tok/s over the memory-bandwidth bound"
        )
    elif result["task"] == "loss":
        table = Table(
            title=f"chatlm bench: loss head, {result['model']} {result['rows']:,} rows x C={result['n_embd']} "
            f"-> V={result['padded_vocab_size']:,}, softcap {result['softcap']:g}, {result['dtype']} "
            f"on {result['device_name']}"
        )
        for col in LOSS_HEADER:
            table.add_column(col, justify="left" if col == "variant" else "right")
        for row in loss_rows(result):
            table.add_row(*row)
    else:
        table = Table(
            title=f"chatlm bench: attention, {result['model']} B={result['batch']} T={result['seq_len']} "
            f"H={result['n_head']} D={result['head_dim']} {result['dtype']} on {result['device_name']}"
        )
        for col in ATTENTION_HEADER:
            table.add_column(col, justify="left" if col == "backend" else "right")
        for row in attention_rows(result):
            table.add_row(*row)
        if result["skipped"]:
            table.caption = "skipped: " + "; ".join(f"{b}: {why}" for b, why in result["skipped"].items())
    console.print(table)


def summary(result: dict) -> dict:
    """The scalar results, for run.json's final metrics."""
    if result["task"] == "train":
        keys = (
            "median_step_s",
            "tok_per_s",
            "mfu_nominal",
            "mfu_measured",
            "peak_mem_gib",
            "attention_backend",
            "timed_steps",
            "last_loss",
        )
        return {k: result[k] for k in keys if result.get(k) is not None}
    if result["task"] == "loss":
        return {f"loss_{e['variant']}_s": e["fwd_bwd_s"] for e in result["results"]}
    if result["task"] == "inference":
        out = {}
        for e in result["results"]:
            out[f"decode_tok_per_s_{e['mode']}_b{e['batch']}"] = e["decode_tok_per_s"]
            out[f"ttft_ms_{e['mode']}_b{e['batch']}"] = e["ttft_ms"]
        return out
    return {f"attention_{b}_s": s for b, s in result["model_attention_fwd_bwd_s"].items() if s is not None}


def bench(cfg: BenchConfig, run: Any) -> dict:
    if cfg.task == "train":
        from chatlm.bench.train_bench import bench_train

        result = bench_train(cfg, run)
    elif cfg.task == "loss":
        from chatlm.bench.loss_bench import bench_loss

        result = bench_loss(cfg, run)
    elif cfg.task == "inference":
        from chatlm.bench.inference_bench import bench_inference

        result = bench_inference(cfg, run)
    else:
        from chatlm.bench.attention_bench import bench_attention

        result = bench_attention(cfg, run)
    if run.ctx.is_main:
        path = run.path / "bench.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print_table(result)
        log.info("wrote %s", path)
    return summary(result)
