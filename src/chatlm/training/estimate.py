"""How long a run will take and how much memory it needs, said before it starts.

Time: the run's training FLOPs over an achieved rate per rank: on a GPU a fraction of its nominal
bf16 peak (`GPU_MFU`, what chatlm reaches at d12-d24 on one H100/H200), on a CPU a fraction of a
matmul timed here in the compute dtype (`CPU_FRACTION`, measured on the quickstart model). It
leaves out evaluation, checkpoints and compilation, so short runs take longer than it says.

Memory per rank: weights, gradients and optimizer state (16 bytes per parameter: fp32 masters and
gradients, two Adam moments or a Muon momentum and its second-moment rows), plus the activations
kept for the backward pass (about 20 values per channel per layer per token of a micro-batch, in the
compute dtype) and, without the fused loss, the fp32 logits and their gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from chatlm.runtime.sinks import format_duration

GPU_MFU = 0.45
CPU_FRACTION = 0.25
STATE_BYTES_PER_PARAM = 16
ACTIVATION_VALUES_PER_CHANNEL = 20
DAY = 86400.0


@dataclass(frozen=True)
class Estimate:
    device: str  # what it was estimated for, e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3"
    rate_flops: Optional[float]  # assumed achieved training FLOP/s per rank (None: unknown)
    basis: str  # where the rate comes from
    seconds: Optional[float]  # training time of the whole run
    memory_bytes: float  # per rank

    @property
    def days(self) -> float:
        return (self.seconds or 0.0) / DAY


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 512, seconds: float = 0.2) -> float:
    """FLOP/s of repeated size^3 matmuls on `device` (after one warm-up)."""
    gen = torch.Generator(device=device).manual_seed(0)  # its own generator: the run's RNG stream is untouched
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * n / (time.perf_counter() - t0)


def memory_per_rank(plan: Any, dtype_bytes: int, fused_loss: bool) -> float:
    acts = plan.device_batch_size * plan.seq_len * plan.n_layer * plan.n_embd * ACTIVATION_VALUES_PER_CHANNEL
    logits = 0 if fused_loss else plan.device_batch_size * plan.seq_len * plan.vocab_size * 4 * 2
    return plan.params["total"] * STATE_BYTES_PER_PARAM + acts * dtype_bytes + logits


def estimate(plan: Any, device: torch.device, dtype: torch.dtype, peak: Optional[float] = None) -> Estimate:
    """The estimate of a plan's run on `device` (the rank's device) in compute dtype `dtype`."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    fused = device.type == "cuda"
    memory = memory_per_rank(plan, dtype_bytes, fused)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rate = peak * GPU_MFU if peak else None
        basis = f"{GPU_MFU:.0%} of {peak / 1e12:.0f} TFLOP/s nominal" if peak else "unknown peak FLOP/s"
    else:
        name = f"{device.type} ({torch.get_num_threads()} threads)"
        measured = matmul_rate(device, dtype)
        rate = measured * CPU_FRACTION
        basis = f"{CPU_FRACTION:.0%} of a {measured / 1e9:.0f} GFLOP/s matmul timed here"
    seconds = plan.total_flops / (rate * plan.world_size) if rate else None
    return Estimate(name, rate, basis, seconds, memory)


def estimate_run(cfg: Any, plan: Any) -> Estimate:
    """The estimate for a config on this machine (its first device of the configured kind)."""
    from chatlm.runtime.device import choose_dtype
    from chatlm.runtime.dist import resolve_device_type
    from chatlm.runtime.flops import peak_flops

    device = torch.device(resolve_device_type(cfg.hardware.device.value, preset=cfg.hardware.name))
    requested = getattr(cfg.precision.dtype, "value", cfg.precision.dtype)
    dtype = choose_dtype(str(requested), device.type)[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return estimate(plan, device, dtype, peak_flops(name, cfg.hardware.peak_flops))


def describe_estimate(est: Estimate) -> list[str]:
    when = format_duration(est.seconds) if est.seconds is not None else "unknown (no peak FLOP/s for this device)"
    lines = [
        f"estimate on {est.device}: training about {when} ({est.basis}); memory about "
        f"{est.memory_bytes / 2**30:.1f} GiB per rank"
    ]
    warning = estimate_warning(est)
    return lines + ([warning] if warning else [])


def estimate_warning(est: Estimate) -> Optional[str]:
    """A line when the run would take more than a day here."""
    if est.seconds is None or est.seconds < DAY:
        return None
    return (
        f"warning: this run would take about {est.days:.0f} days on {est.device}; for a first run pick a "
        "smaller model (experiment=quickstart, model=d4), fewer steps (steps=N) or a GPU (hardware=h100x1)"
    )
