"""task=train: timed optimizer steps of the real training step, on synthetic or real tokens.

The model, optimizer, schedule and plan are built by `chatlm.training` exactly as pretraining
builds them, and each timed step is `Trainer.step()` itself, so the benchmark cannot drift from
training. `tokens=data` feeds the real loader on the data group's shards (its host work, tokenizing
and packing, is then part of every step); `tokens=synthetic` uniform random ids.

fp8: `precision=fp8` converts the eligible Linears to Float8Linear before compile, as nanochat's
base_train and chatlm's pretraining do.
"""

from __future__ import annotations

import gc
import logging
import math
import platform
import statistics
from typing import Any, Optional

import torch

from chatlm.bench.timing import matmul_ceiling, median
from chatlm.config import BenchConfig
from chatlm.model.sizing import derive_dims
from chatlm.runtime.flops import mfu, peak_flops
from chatlm.training.batches import SyntheticBatches
from chatlm.training.build import build_training_model, pretrain_trainer
from chatlm.training.plan import plan_run
from chatlm.training.trainer import Trainer

log = logging.getLogger("chatlm")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def kernel_bench_shapes(cfg: BenchConfig, run: Any, batch_size: int) -> tuple[torch.device, torch.dtype, Any, int]:
    """(device, compute dtype, model dims, batch) of a kernel bench (task=attention or loss);
    batch_size -1 means hardware.device_batch_size."""
    dims = derive_dims(cfg.model, cfg.model.vocab_size or cfg.tokenizer.vocab_size)
    B = batch_size if batch_size > 0 else cfg.hardware.device_batch_size
    return run.ctx.device, run.policy.compute_dtype, dims, B


def _gib(n: float) -> float:
    return n / 2**30


def _batches(cfg: BenchConfig, run: Any, plan: Any, tok: Any, shard_dirs: list) -> Any:
    ctx = run.ctx
    if tok is None:
        return SyntheticBatches(plan.vocab_size, plan.device_batch_size, plan.seq_len, ctx.device, cfg.seed + ctx.rank)
    from chatlm.data.loader import rank_loader, train_sets

    return rank_loader(train_sets(shard_dirs, cfg.data), tok, plan.device_batch_size, plan.seq_len, ctx, cfg.data)


def _trainer(cfg: BenchConfig, run: Any) -> tuple[Trainer, Any, Any]:
    """(trainer, plan, built model) as pretraining would build them, with this bench's tokens."""
    from chatlm.training.pretrain import data_dirs, load_or_train_tokenizer

    ctx, policy = run.ctx, run.policy
    tok, shard_dirs = None, []
    if cfg.tokens == "data":
        shard_dirs = data_dirs(cfg, run)
        tok = load_or_train_tokenizer(cfg, run, shard_dirs)
    vocab_size = tok.vocab_size if tok is not None else cfg.model.vocab_size or cfg.tokenizer.vocab_size
    plan = plan_run(cfg, vocab_size, ctx.world_size)
    built = build_training_model(cfg.model, vocab_size, policy, ctx.device)
    trainer = pretrain_trainer(cfg, built, plan, _batches(cfg, run, plan, tok, shard_dirs), ctx, policy)
    log.info(
        "bench d%d (%s): %d x %d x %d ranks x %d accumulation = %s tokens/step | backend %s | %s%s | "
        "compile %s | %d steps, %d warm-up",
        plan.n_layer,
        built.model.dims.window_chars(),
        plan.device_batch_size,
        plan.seq_len,
        ctx.world_size,
        plan.grad_accum,
        f"{plan.total_batch_size:,}",
        built.backend,
        policy.dtype_name,
        f" + fp8 ({built.fp8_linears} linears)" if built.fp8_linears else "",
        policy.compile,
        plan.num_iterations,
        cfg.warmup_steps,
    )
    return trainer, plan, built


def _profile(cfg: BenchConfig, run: Any, trainer: Trainer) -> Optional[dict]:
    """`profile_steps` more steps under torch.profiler (at the last step's hyperparameters)."""
    if cfg.profile_steps <= 0:
        return None
    from chatlm.bench.profile import profile_steps

    times: list[float] = []

    def last_step() -> None:
        trainer.state.step = trainer.total_steps - 1
        times.append(trainer.step().dt)

    profile = profile_steps(last_step, cfg.profile_steps, run.ctx.device, trace_dir=run.path if run.is_main else None)
    profile["step_times_s"] = times
    log.info(
        "profile of %d steps: %.1f ms of %s per step: %s",
        cfg.profile_steps,
        profile["total_ms_per_step"],
        profile["clock"],
        ", ".join(f"{k} {v:.1f}" for k, v in profile["by_category_ms_per_step"].items()),
    )
    return profile


def _timed_steps(cfg: BenchConfig, trainer: Trainer) -> tuple[list[float], list[float]]:
    """(step times, losses) of every step: `Trainer.step()`, the GC frozen after the first as in training."""
    times, losses = [], []
    for i in range(trainer.total_steps):
        result = trainer.step()
        times.append(result.dt)
        losses.append(result.loss)
        if i == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        log.info(
            "step %d/%d | %.1f ms | loss %.4f%s",
            result.step,
            trainer.total_steps,
            1000 * result.dt,
            result.loss,
            " (warm-up)" if i < cfg.warmup_steps else "",
        )
    return times, losses


def bench_train(cfg: BenchConfig, run: Any) -> dict:
    device = run.ctx.device
    # the ceiling first, on an empty card; then peak memory counts training only
    ceiling = matmul_ceiling(device, cfg.ceiling_size, cfg.ceiling_iters) if cfg.ceiling else None
    if ceiling:
        log.info(
            "bf16 %d^3 matmul: %.1f TFLOP/s (median of %d)", ceiling["size"], ceiling["flops"] / 1e12, ceiling["iters"]
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer, plan, built = _trainer(cfg, run)
    try:
        step_times, losses = _timed_steps(cfg, trainer)
        profile = _profile(cfg, run, trainer)
    finally:
        gc.enable()
    return _result(cfg, run, plan, built, step_times, losses, ceiling, profile)


def _result(
    cfg: BenchConfig,
    run: Any,
    plan: Any,
    built: Any,
    step_times: list[float],
    losses: list[float],
    ceiling: Optional[dict],
    profile: Optional[dict],
) -> dict:
    ctx, policy, device = run.ctx, run.policy, run.ctx.device
    N, B, T, accum = plan.num_iterations, plan.device_batch_size, plan.seq_len, plan.grad_accum
    model, backend, n_fp8, vocab_size = built.model, built.backend, built.fp8_linears, plan.vocab_size
    # --- statistics
    timed = step_times[cfg.warmup_steps :]
    med = median(timed)
    tok_s = plan.total_batch_size / med
    name = device_name(device)
    peak_nominal = peak_flops(name if device.type == "cuda" else "", cfg.hardware.peak_flops)
    ceiling_flops: Optional[float] = ceiling["flops"] if ceiling else cfg.hardware.measured_flops
    ceiling_source = (
        "measured in this process" if ceiling else "hardware.measured_flops" if cfg.hardware.measured_flops else None
    )
    result = {
        "task": "train",
        "device": str(device),
        "device_name": name,
        "world_size": ctx.world_size,
        "torch": torch.__version__,
        "model": cfg.model.name,
        "depth": plan.n_layer,
        "n_embd": plan.n_embd,
        "n_head": plan.n_head,
        "head_dim": model.dims.head_dim,
        "windows": model.dims.window_chars(),
        "seq_len": T,
        "vocab_size": vocab_size,
        "params": plan.params["total"],
        "scaling_params": plan.scaling_params,
        "flops_per_token": plan.flops_per_token,
        "device_batch_size": B,
        "grad_accum": accum,
        "tokens_per_step": plan.total_batch_size,
        "tokens": cfg.tokens,
        "attention_backend": backend,
        "compile": policy.compile,
        "dtype": policy.dtype_name,
        "fp8": policy.fp8,
        "fp8_linears": n_fp8,
        "steps": N,
        "warmup_steps": cfg.warmup_steps,
        "timed_steps": len(timed),
        "step_times_s": step_times,
        "first_step_s": step_times[0],
        "median_step_s": med,
        "mean_step_s": sum(timed) / len(timed),
        "min_step_s": min(timed),
        "max_step_s": max(timed),
        "step_time_cv": statistics.pstdev(timed) / statistics.mean(timed) if len(timed) > 1 else 0.0,
        "p90_step_s": sorted(timed)[min(len(timed) - 1, int(0.9 * len(timed)))],
        "tok_per_s": tok_s,
        "tok_per_s_per_device": tok_s / ctx.world_size,
        "peak_flops_nominal": peak_nominal,
        "mfu_nominal": mfu(plan.flops_per_token, tok_s, peak_nominal, ctx.world_size),
        "ceiling": ceiling,
        "ceiling_flops": ceiling_flops,
        "ceiling_source": ceiling_source,
        "mfu_measured": mfu(plan.flops_per_token, tok_s, ceiling_flops, ctx.world_size),
        "peak_mem_gib": _gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None,
        "losses": losses,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses_finite": all(math.isfinite(v) for v in losses),
        "profile": profile,
    }
    return result
