"""Where a training step's device time goes: torch.profiler over a few extra steps, kernels grouped.

Used by task=train with `profile_steps > 0`: the profiled steps run after the timed ones and are
not part of the step statistics (the profiler itself slows the host side). On CUDA the kernels'
own device times are summed; on a CPU the operators' self CPU times stand in for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

# (category, substrings of the kernel name), first match wins; names are matched lower-cased
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flex_attention", "triton_tem", "fmha", "flash", "attention", "cudnn")),
    (
        "matmul",
        (
            "gemm",
            "nvjet",
            "xmma",
            "cutlass",
            "sm90_",
            "scaled_mm",
            "cublas",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::matmul",
            "aten::linear",
        ),
    ),
    ("fused triton (elementwise, norms, loss, optimizer)", ("triton_", "softcap_ce", "qkv_rope")),
    ("memory copies", ("memcpy", "memset", "copy_", "aten::copy")),
    ("communication", ("nccl", "all_reduce", "reduce_scatter", "all_gather")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def is_annotation(event: Any) -> bool:
    """A user/record_function range rather than a kernel or operator (its time would count twice)."""
    name = str(event.key)
    return bool(getattr(event, "is_user_annotation", False)) or "#" in name or name.startswith("ProfilerStep")


def top_kernels(fn: Callable[[], Any], n: int = 10) -> list[dict[str, Any]]:
    """Run `fn` once under the CUDA profiler: its `n` longest kernels (name, ms, calls). For the
    GPU microbenches in launch/gpu/."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(
        (e for e in prof.key_averages() if e.device_type.name == "CUDA"),
        key=lambda e: e.self_device_time_total,
        reverse=True,
    )[:n]
    return [{"kernel": e.key[:90], "ms": round(e.self_device_time_total / 1000, 3), "calls": e.count} for e in rows]


def profile_steps(
    run_step: Callable[[], None], steps: int, device: torch.device, trace_dir: Optional[Path] = None, top: int = 25
) -> dict[str, Any]:
    """Run `run_step` `steps` times under torch.profiler and summarize its kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
    on_cuda = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        if is_annotation(e):
            continue  # record_function ranges (e.g. "Optimizer.step#MuonAdamW.step") overlap the kernels
        if on_cuda:
            if str(getattr(e, "device_type", "")).endswith("CUDA") and e.self_device_time_total > 0:
                rows.append((e.key, e.self_device_time_total, e.count))
        elif e.self_cpu_time_total > 0:
            rows.append((e.key, e.self_cpu_time_total, e.count))
    total_us = sum(t for _, t, _ in rows)
    by_category: dict[str, float] = {}
    for name, t, _ in rows:
        cat = categorize(name)
        by_category[cat] = by_category.get(cat, 0.0) + t
    rows.sort(key=lambda r: -r[1])
    summary = {
        "steps": steps,
        "clock": "kernel device time" if on_cuda else "operator self CPU time",
        "total_ms_per_step": total_us / 1000 / steps,
        "by_category_ms_per_step": {k: v / 1000 / steps for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top": [
            {
                "name": n[:200],
                "category": categorize(n),
                "ms_per_step": t / 1000 / steps,
                "calls_per_step": c / steps,
                "share": t / total_us if total_us else 0.0,
            }
            for n, t, c in rows[:top]
        ],
    }
    if trace_dir is not None:
        sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
        (trace_dir / "profile.txt").write_text(
            prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90) + "\n"
        )
        # every kernel (the table and `top` stop early): one line each, longest first
        lines = ["ms_per_step\tcalls_per_step\tcategory\tname"]
        lines += [f"{t / 1000 / steps:.3f}\t{c / steps:g}\t{categorize(n)}\t{n}" for n, t, c in rows]
        (trace_dir / "kernels.tsv").write_text("\n".join(lines) + "\n")
    return summary
