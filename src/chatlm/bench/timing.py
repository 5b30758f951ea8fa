"""Timing helpers shared by the benchmarks: medians, device-event timing, the matmul ceiling."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of `fn`, one value per timed call, after `warmup` untimed calls.

    CUDA: a pair of events around each call (the device's own clock; calls are queued back to back,
    so launch gaps that the host cannot hide are counted). CPU: perf_counter around each call.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        pairs = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1000.0 for s, e in pairs]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_ceiling(
    device: torch.device, size: int = 8192, iters: int = 10, dtype: torch.dtype = torch.bfloat16
) -> Optional[dict]:
    """The FLOP/s of a size^3 matmul on random data (median of `iters` after 3 warm-ups).

    This is the practical ceiling the MFU "vs measured" divides by. CUDA only (None elsewhere): on a
    CPU the number would say nothing about the bf16 tensor-core peak MFU is defined against.
    """
    if device.type != "cuda":
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = time_calls(lambda: torch.matmul(a, b, out=out), iters, 3, device)
    sec = median(times)
    a = b = out = None  # free the matrices before emptying the cache
    torch.cuda.empty_cache()
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": iters,
        "median_s": sec,
        "flops": 2.0 * size**3 / sec,
    }
