"""task=train: timed optimizer steps of the real training step, on synthetic or real tokens.

Everything that is reusable is taken from `chatlm.train` (plan_run for the batch/accumulation/LR
transfer, data_dirs and load_or_train_tokenizer for tokens=data) and from the library (select_backend,
GPT, build_optimizer, LossScaler, the loader). The step itself lives inside `chatlm.train.train()`
and is not reusable, so `_step` below repeats its few lines: accumulate `grad_accum` micro-batches,
set the schedule's hyperparameters, one `.item()`, optimizer step, zero_grad, synchronize.

fp8: `precision=fp8` converts the eligible Linears to Float8Linear before compile, as nanochat's
base_train and chatlm.train do.
"""

from __future__ import annotations

import gc
import logging
import math
import platform
import time
from typing import Any, Callable, Optional

import torch

from chatlm.bench.timing import matmul_ceiling, median, sync
from chatlm.config import BenchConfig, TrainConfig
from chatlm.model import GPT, select_backend
from chatlm.model.sizing import derive_dims
from chatlm.optim import build_optimizer, lr_multiplier_from_config, muon_momentum, muon_weight_decay
from chatlm.optim.loss_scale import LossScaler
from chatlm.runtime.flops import mfu, peak_flops

log = logging.getLogger("chatlm")


def as_train_config(cfg: BenchConfig) -> TrainConfig:
    """The TrainConfig this benchmark stands for (steps = the bench's steps), for plan_run."""
    return TrainConfig(
        run_name=cfg.run_name,
        seed=cfg.seed,
        paths=cfg.paths,
        hardware=cfg.hardware,
        precision=cfg.precision,
        model=cfg.model,
        optim=cfg.optim,
        schedule=cfg.schedule,
        data=cfg.data,
        tokenizer=cfg.tokenizer,
        steps=cfg.steps,
        total_batch_size=cfg.total_batch_size,
        auto_tokenizer=cfg.auto_tokenizer,
    )


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


def synthetic_batches(vocab_size: int, B: int, T: int, device: torch.device, seed: int) -> Callable:
    """next_batch() -> (x, y): uniform random ids in [0, vocab), y the next-token shift of x."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab_size, (B, T + 1), device=device, generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    return next_batch


def _gib(n: float) -> float:
    return n / 2**30


def bench_train(cfg: BenchConfig, run: Any) -> dict:
    from chatlm.train import data_dirs, load_or_train_tokenizer, plan_run

    ctx, policy = run.ctx, run.policy
    device, dtype = ctx.device, policy.compute_dtype

    # --- tokens and plan (the same derivations as chatlm.train)
    tcfg = as_train_config(cfg)
    tok = None
    if cfg.tokens == "data":
        shard_dirs = data_dirs(tcfg, run)
        tok = load_or_train_tokenizer(tcfg, run, shard_dirs)
        vocab_size = tok.vocab_size
    else:
        vocab_size = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    plan = plan_run(tcfg, vocab_size, ctx.world_size)
    N, B, T, accum = plan.num_iterations, plan.device_batch_size, plan.seq_len, plan.grad_accum

    # --- the ceiling first, on an empty card; then peak memory counts training only
    ceiling = matmul_ceiling(device, cfg.ceiling_size, cfg.ceiling_iters) if cfg.ceiling else None
    if ceiling:
        log.info(
            "bf16 %d^3 matmul: %.1f TFLOP/s (median of %d)", ceiling["size"], ceiling["flops"] / 1e12, ceiling["iters"]
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # --- model and optimizer, as chatlm.train builds them
    backend = select_backend(cfg.model.attention_backend, device, dtype)
    with torch.device("meta"):
        model = GPT(cfg.model, vocab_size, dtype, backend)
    model.to_empty(device=device)
    model.init_weights()
    n_fp8 = 0
    if policy.fp8:
        from chatlm.model.fp8 import convert_to_fp8

        n_fp8 = convert_to_fp8(model)
    train_model = policy.compile_model(model)
    optimizer = build_optimizer(
        model,
        cfg.optim,
        plan.n_embd,
        plan.batch_lr_scale,
        plan.muon_weight_decay,
        compute_dtype=dtype,
        compile=policy.compile,
    )
    scaler = LossScaler(enabled=dtype == torch.float16)
    params = list(model.parameters())
    log.info(
        "bench d%d (%s): %d x %d x %d ranks x %d accumulation = %s tokens/step | backend %s | %s%s | "
        "compile %s | %d steps, %d warm-up",
        plan.n_layer,
        model.dims.window_chars(),
        B,
        T,
        ctx.world_size,
        accum,
        f"{plan.total_batch_size:,}",
        backend,
        policy.dtype_name,
        f" + fp8 ({n_fp8} linears)" if n_fp8 else "",
        policy.compile,
        N,
        cfg.warmup_steps,
    )

    if tok is not None:
        from chatlm.data.loader import make_loader
        from chatlm.data.shards import list_shards

        splits = [list_shards(d) for d in shard_dirs]
        loader = make_loader(
            [(train, s.weight) for (train, _), s in zip(splits, cfg.data.sources)],
            tok,
            B,
            T,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=device,
            buffer_size=cfg.data.doc_buffer,
            threads=cfg.data.tokenizer_threads,
        )
        next_batch = loader.next_batch
    else:
        next_batch = synthetic_batches(vocab_size, B, T, device, cfg.seed + ctx.rank)

    # --- the timed loop (the step of chatlm.train.train, repeated here)
    step_times: list[float] = []
    losses: list[float] = []
    batch = [next_batch()]

    def run_step(step: int) -> float:
        t0 = time.perf_counter()
        x, y = batch[0]
        for _ in range(accum):
            loss = train_model(x, y)
            scaler.scale_loss(loss / accum).backward()
            x, y = next_batch()  # host work overlaps the queued device work
        batch[0] = (x, y)
        optimizer.set_hyperparameters(
            lr_multiplier_from_config(cfg.schedule, step, N),
            muon_momentum(
                step,
                N,
                cfg.schedule.warmdown_ratio,
                cfg.optim.momentum_start,
                cfg.optim.momentum,
                cfg.optim.momentum_warmup_steps,
                cfg.optim.momentum_end,
            ),
            muon_weight_decay(step, N, plan.muon_weight_decay),
        )
        finite_grads = scaler.unscale_and_check(params)
        last = loss.detach().item()  # the one host sync of the step
        if finite_grads:
            optimizer.step()
        scaler.update(finite_grads)
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        step_times.append(time.perf_counter() - t0)
        losses.append(last)
        return last

    profile = None
    try:
        for step in range(N):
            last = run_step(step)
            if step == 0:  # as chatlm.train: freeze the GC after the first step
                gc.collect()
                gc.freeze()
                gc.disable()
            log.info(
                "step %d/%d | %.1f ms | loss %.4f%s",
                step + 1,
                N,
                1000 * step_times[-1],
                last,
                " (warm-up)" if step < cfg.warmup_steps else "",
            )
        if cfg.profile_steps > 0:
            from chatlm.bench.profile import profile_steps

            timed_times, timed_losses = list(step_times), list(losses)
            profile = profile_steps(
                lambda: run_step(N - 1), cfg.profile_steps, device, trace_dir=run.path if ctx.is_main else None
            )
            profile["step_times_s"] = step_times[N:]
            step_times[:], losses[:] = timed_times, timed_losses
            log.info(
                "profile of %d steps: %.1f ms of %s per step: %s",
                cfg.profile_steps,
                profile["total_ms_per_step"],
                profile["clock"],
                ", ".join(f"{k} {v:.1f}" for k, v in profile["by_category_ms_per_step"].items()),
            )
    finally:
        gc.enable()

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
