"""`python -m chatlm.check`: prove the launch path works before spending GPU hours on it.

Runs on every rank exactly as a training run would start (spawned ranks, torchrun, Slurm, submitit)
and checks that: the ranks reduce correctly (all_reduce of rank+1 == W(W+1)/2), every rank sees
the same run directory, and the device computes (timed matmuls in the compute dtype). Writes a
normal run directory; the numbers land in run.json's final_metrics and metrics.jsonl.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as tdist

from chatlm.config import CheckConfig
from chatlm.hydra.app import run_stage
from chatlm.runtime.rundir import Run

log = logging.getLogger("chatlm")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(cfg: CheckConfig, run: Run) -> dict:
    ctx, policy = run.ctx, run.policy
    world = ctx.world_size
    value = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    if ctx.distributed:
        tdist.all_reduce(value)
    expected = world * (world + 1) / 2
    if value.item() != expected:
        raise RuntimeError(f"all_reduce gave {value.item()}, expected {expected}: the ranks are not wired right")
    dirs = ctx.all_gather_object(str(run.path))
    if len(set(dirs)) != 1:
        raise RuntimeError(f"ranks disagree on the run directory: {sorted(set(dirs))}")

    n = cfg.matmul_size
    a = torch.randn(n, n, device=ctx.device, dtype=policy.compute_dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=policy.compute_dtype)
    a @ b
    _sync(ctx.device)
    t0 = time.perf_counter()
    for _ in range(cfg.matmul_iters):
        a @ b
    _sync(ctx.device)
    dt = max(time.perf_counter() - t0, 1e-9)
    tflops = 2 * n**3 * cfg.matmul_iters / dt / 1e12
    run.log_metrics(step=0, all_reduce=value.item(), matmul_tflops=tflops)
    log.info(
        "rank %d: all_reduce %.0f (expected %.0f), matmul %.3f TFLOP/s (%s)",
        ctx.rank,
        value.item(),
        expected,
        tflops,
        policy.dtype_name,
    )
    if cfg.sleep_s > 0:
        time.sleep(cfg.sleep_s)
    if cfg.fail:
        raise RuntimeError("check failed on purpose (fail=true)")
    return {
        "world_size": world,
        "all_reduce": value.item(),
        "ranks_agree_on_run_dir": True,
        "matmul_tflops": round(tflops, 4),
        "compute_dtype": policy.dtype_name,
    }


def main() -> None:
    run_stage("check", check)


if __name__ == "__main__":
    main()
