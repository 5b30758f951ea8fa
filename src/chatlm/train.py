"""`python -m chatlm.train`: pretrain a base model with nanochat's recipe (its base_train).

Reading order: `plan_run` derives every number the run needs from the config (width, batch size,
learning-rate and weight-decay transfer, horizon); `train` builds the tokenizer, data, model and
optimizer, then runs the loop: periodic validation bits-per-byte, samples and checkpoints, and one
optimizer step per iteration with gradient accumulation. Everything a run produces goes into its
run directory (chatlm.runtime.rundir).

Resuming: with `resume=auto` (the default) a run directory that already has checkpoints continues
from `checkpoints/latest`, exactly: model, optimizer, data loader position and RNG are restored, so
the losses match an uninterrupted run (bitwise on CPU). SIGTERM / SIGUSR1 (Slurm preemption and
time limits) write a checkpoint at the end of the current step and stop with status `preempted`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as tdist

from chatlm.app import run_stage
from chatlm.config import ConfigError, ModelConfig, TrainConfig
from chatlm.data.loader import make_loader
from chatlm.data.shards import list_shards
from chatlm.data.sources import prepare_source
from chatlm.errors import ChatlmError
from chatlm.model import GPT, select_backend
from chatlm.model.fp8 import convert_to_fp8, fp8_disabled
from chatlm.optim import build_optimizer, depth_transfer, lr_multiplier_from_config, muon_momentum, muon_weight_decay
from chatlm.optim.loss_scale import LossScaler
from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime.flops import mfu, peak_flops
from chatlm.runtime.profile import StepProfiler
from chatlm.runtime.rundir import Preempted, Run, config_hash
from chatlm.runtime.sinks import ProgressReporter, open_sinks
from chatlm.tokenizer import Tokenizer, tokenizer_dir

log = logging.getLogger("chatlm")


class NonFiniteLoss(ChatlmError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# planning: every derived number, before anything is allocated


@dataclass(frozen=True)
class Plan:
    vocab_size: int
    n_embd: int
    n_head: int
    n_layer: int
    windows: tuple[int, ...]
    params: dict
    scaling_params: int
    flops_per_token: int
    ref_scaling_params: int
    target_tokens: int
    total_batch_size: int
    batch_lr_scale: float
    muon_weight_decay: float
    num_iterations: int
    device_batch_size: int
    seq_len: int
    world_size: int
    grad_accum: int
    total_tokens: int
    total_flops: float
    tokens_per_param: float


def _meta_model(model_cfg: ModelConfig, vocab_size: int) -> GPT:
    with torch.device("meta"):
        return GPT(model_cfg, vocab_size, torch.float32, "sdpa")


def plan_run(cfg: TrainConfig, vocab_size: int, world_size: int) -> Plan:
    """Sizes, batch, LR/WD transfer and horizon (nanochat §3.2-3.3), from the config alone."""
    model = _meta_model(cfg.model, vocab_size)
    ref_cfg = replace(cfg.model, depth=cfg.optim.reference_depth, backout_layer=None)
    ref = _meta_model(ref_cfg, vocab_size)
    transfer = depth_transfer(
        model.num_scaling_params(),
        ref.num_scaling_params(),
        cfg.target_param_data_ratio,
        cfg.optim.weight_decay,
        cfg.total_batch_size,
        cfg.optim.reference_batch_tokens,
        cfg.optim.batch_size_exponent,
        cfg.steps,
        cfg.target_flops,
        model.flops_per_token(),
    )
    B, T = cfg.hardware.device_batch_size, cfg.model.sequence_len
    micro = B * T * world_size
    if transfer.batch_tokens % micro:
        raise ConfigError(
            "total_batch_size",
            f"{transfer.batch_tokens:,} tokens per step is not a multiple of device_batch_size x "
            f"sequence_len x world_size = {B} x {T} x {world_size} = {micro:,}; change "
            f"total_batch_size or hardware.device_batch_size",
        )
    if transfer.num_iterations < 1:
        raise ConfigError("steps", f"the derived horizon is {transfer.num_iterations} steps; set steps explicitly")
    d = model.dims
    total_tokens = transfer.num_iterations * transfer.batch_tokens
    return Plan(
        vocab_size=vocab_size,
        n_embd=d.n_embd,
        n_head=d.n_head,
        n_layer=d.n_layer,
        windows=tuple(d.windows),
        params=model.num_params(),
        scaling_params=model.num_scaling_params(),
        flops_per_token=model.flops_per_token(),
        ref_scaling_params=ref.num_scaling_params(),
        target_tokens=transfer.target_tokens,
        total_batch_size=transfer.batch_tokens,
        batch_lr_scale=transfer.batch_lr_scale,
        muon_weight_decay=transfer.weight_decay,
        num_iterations=transfer.num_iterations,
        device_batch_size=B,
        seq_len=T,
        world_size=world_size,
        grad_accum=transfer.batch_tokens // micro,
        total_tokens=total_tokens,
        total_flops=float(model.flops_per_token()) * total_tokens,
        tokens_per_param=total_tokens / model.num_scaling_params(),
    )


def due(step: int, every: int, last: bool, at_start: bool = False) -> bool:
    """Periodic work: at multiples of `every` (> 0), at the end, and at step 0 only if `at_start`."""
    return last or (every > 0 and (step > 0 or at_start) and step % every == 0)


# ----------------------------------------------------------------------------------------------
# set-up helpers


def load_or_train_tokenizer(cfg: TrainConfig, run: Run, shard_dirs: list[Path]) -> Tokenizer:
    """The configured tokenizer; trained here first (main rank) when `auto_tokenizer` is set."""
    ctx = run.ctx
    path = tokenizer_dir(cfg.tokenizer, cfg.paths)
    if not (path / "tokenizer.json").exists() and cfg.auto_tokenizer:
        if ctx.is_main:
            from chatlm.tokenize import training_texts
            from chatlm.tokenizer import train_tokenizer

            log.info(
                "no tokenizer at %s: training %s (vocab %d) on the train shards first (auto_tokenizer=true)",
                path,
                cfg.tokenizer.name,
                cfg.tokenizer.vocab_size,
            )
            sets = [(list_shards(d)[0], s.weight) for d, s in zip(shard_dirs, cfg.data.sources)]
            tok = train_tokenizer(training_texts(sets, cfg.tokenizer.max_chars), cfg.tokenizer)
            tok.save(path)
        ctx.barrier()
    return Tokenizer.load(path)


def data_dirs(cfg: TrainConfig, run: Run) -> list[Path]:
    ctx = run.ctx
    dirs = []
    for source in cfg.data.sources:
        dirs.append(prepare_source(source, cfg.paths, rank_is_main=ctx.is_main, wait_for=ctx.barrier))
        if ctx.is_main:
            ctx.barrier()  # the other ranks wait in prepare_source until the main rank is done
    return dirs


def check_architecture(state: dict, cfg: TrainConfig, vocab_size: int) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the fields."""
    saved = state["meta"].get("model_config") or {}
    current = json.loads(json.dumps(asdict(cfg.model), default=lambda v: getattr(v, "value", str(v))))
    # labels and kernel choices (the same function of the same weights), not architecture
    ignore = {"name", "attention_backend", "loss_kernel", "qkv_matmul", "rope_kernel"}
    diff = [
        f"model.{k}: checkpoint {saved[k]!r}, config {current.get(k)!r}"
        for k in sorted(saved)
        if k not in ignore and k in current and saved[k] != current[k]
    ]
    if state["meta"].get("vocab_size") not in (None, vocab_size):
        diff.append(f"vocab size: checkpoint {state['meta']['vocab_size']}, tokenizer {vocab_size}")
    if diff:
        raise ChatlmError(
            f"checkpoint {state['path']} was trained with another architecture:\n  "
            + "\n  ".join(diff)
            + "\nset these model.* keys to the checkpoint's values"
        )


class RepeatBatches:
    """`overfit_batches=N` (debug=overfit): the first N micro-batches, over and over. A model and
    optimizer that cannot drive the loss on them towards zero have a bug."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n, self.batches, self.i = loader, n, [], 0

    def next_batch(self) -> Any:
        if len(self.batches) < self.n:
            self.batches.append(self.loader.next_batch())
            return self.batches[-1]
        batch = self.batches[self.i % self.n]
        self.i += 1
        return batch

    def state_dict(self, **kwargs: Any) -> dict:
        return self.loader.state_dict(**kwargs)


class StopSignal:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into a flag checked once per step (all ranks agree via all_reduce).

    The loop then saves a checkpoint and raises `Preempted`. SIGUSR2 is what submitit sends before a
    Slurm time limit (and on preemption): the handler it had installed is handed on as
    `Preempted.requeue`, so the job is requeued only after the checkpoint exists.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None or signum == signal.SIGUSR2:  # USR2 (requeue) wins over the SIGTERM after it
            self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requeue_handler(self) -> Optional[Callable]:
        """The handler that owned SIGUSR2 before us (submitit's requeue), if that is what arrived."""
        handler = self._previous.get(signal.SIGUSR2)
        return handler if self.signum == signal.SIGUSR2 and callable(handler) else None

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def agreed(self, ctx: Any) -> bool:
        flag = self.signum is not None
        if ctx.distributed:
            t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


# ----------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig, run: Run) -> dict:
    ctx, policy = run.ctx, run.policy
    device, dtype = ctx.device, policy.compute_dtype

    # --- tokenizer, data, plan
    shard_dirs = data_dirs(cfg, run)
    tok = load_or_train_tokenizer(cfg, run, shard_dirs)
    splits = [list_shards(d) for d in shard_dirs]  # (train files, val file) per source
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
        raise ConfigError("model.vocab_size", f"is {cfg.model.vocab_size} but the tokenizer has {tok.vocab_size} ids")
    plan = plan_run(cfg, tok.vocab_size, ctx.world_size)
    run.record_derived(**asdict(plan), tokenizer_dir=str(tokenizer_dir(cfg.tokenizer, cfg.paths)))
    N, B, T, accum = plan.num_iterations, plan.device_batch_size, plan.seq_len, plan.grad_accum
    log.info(
        "model d%d: width %d, %d heads, windows %s | %s params (%s scaling) | %.3g FLOPs/token",
        plan.n_layer,
        plan.n_embd,
        plan.n_head,
        "".join("L" if w >= T else "S" for w in plan.windows),
        f"{plan.params['total']:,}",
        f"{plan.scaling_params:,}",
        plan.flops_per_token,
    )
    log.info(
        "batch %s tokens/step (LR x%.3f, Muon WD %.4f) = %d x %d x %d ranks x %d accumulation | %d steps | "
        "%s tokens (%.1f tokens/param) | %.3g FLOPs",
        f"{plan.total_batch_size:,}",
        plan.batch_lr_scale,
        plan.muon_weight_decay,
        B,
        T,
        ctx.world_size,
        accum,
        N,
        f"{plan.total_tokens:,}",
        plan.tokens_per_param,
        plan.total_flops,
    )

    # --- model and optimizer (identical init on every rank: same seed, no broadcast needed)
    backend = select_backend(cfg.model.attention_backend, device, dtype)
    with torch.device("meta"):
        model = GPT(cfg.model, tok.vocab_size, dtype, backend)
    model.to_empty(device=device)
    model.init_weights()
    n_fp8 = 0
    if policy.fp8:  # before compile: the compiled graph must see the Float8Linears
        n_fp8 = convert_to_fp8(model)
    log.info(
        "attention backend: %s | compute dtype %s (%s) | compile %s | fp8 linears %d",
        backend,
        policy.dtype_name,
        policy.dtype_reason,
        policy.compile,
        n_fp8,
    )
    run.record_derived(attention_backend=backend, fp8_linears=n_fp8)
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
    token_bytes = tok.token_bytes_tensor(device)

    # --- resume / init_from
    step, loop = 0, {"min_val_bpb": float("inf"), "smooth_loss": 0.0, "train_time": 0.0}
    loader_state, other_ranks_loaders = None, None
    found = None
    if cfg.resume == "auto":
        found = ckpt.latest_checkpoint(run.path)
    elif cfg.resume not in ("auto", "never"):
        found = ckpt.find_checkpoint(cfg.resume)
    if found is not None:
        state = ckpt.load_checkpoint(found, map_location=device)
        check_architecture(state, cfg, tok.vocab_size)
        model.load_state_dict(state["model"])
        optimizer.load_full_state_dict(state["optim"])
        meta = state["meta"]
        step, loop = int(meta["step"]), dict(meta["loop"])
        scaler.load_state_dict(meta.get("loss_scale", scaler.state_dict()))
        if meta["world_size"] == ctx.world_size:
            loader_state = state["loader"][ctx.rank]
            ckpt.restore_rng_state(state["rng"][ctx.rank])
        else:
            other_ranks_loaders = state["loader"]
            log.warning(
                "checkpoint written by %d ranks, resuming on %d: model and optimizer resume exactly; the "
                "data stream continues after the furthest row group any old rank had read (nothing is "
                "read twice; their packing buffers and a few row groups per rank are skipped)",
                meta["world_size"],
                ctx.world_size,
            )
        log.info("resumed from %s at step %d", found, step)
    elif cfg.init_from:
        state = ckpt.load_checkpoint(ckpt.find_checkpoint(cfg.init_from), map_location=device, parts=("model",))
        check_architecture(state, cfg, tok.vocab_size)
        model.load_state_dict(state["model"])
        log.info("initialized weights from %s", state["path"])

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
        state=loader_state,
    )
    if other_ranks_loaders is not None:
        loader.continue_after(other_ranks_loaders)
    if cfg.overfit_batches > 0:
        loader = RepeatBatches(loader, cfg.overfit_batches)
    eval_steps = max(1, cfg.eval_tokens // (B * T * ctx.world_size))
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "", cfg.hardware.peak_flops)
    sweep = (run.record().get("sweep") or {}) if ctx.is_main else {}
    group = Path(sweep["dir"]).name if sweep.get("dir") else None  # one wandb group per sweep
    sinks = open_sinks(
        cfg.logger,
        run.path,
        run.resolved,
        cfg.run_name,
        group=group,
        is_main=ctx.is_main,
        resume_step=step if found is not None else None,
    )
    progress = ProgressReporter(N, is_main=ctx.is_main)
    start_step = step
    profiler = StepProfiler(run.path, ctx.rank, start_step + cfg.profile_start, cfg.profile_steps, device)

    def save(at: int) -> None:
        if not weights_finite():  # never let a checkpoint replace the last good one with inf/nan weights
            raise NonFiniteLoss(
                f"the weights hold inf/nan at step {at} (an update overflowed); nothing was saved; {last_good()}"
            )
        optim_state = optimizer.full_state_dict()  # collective
        loaders = ctx.all_gather_object(loader.state_dict(include_last_batch=True))  # (x, y) is prefetched
        rngs = ctx.all_gather_object(ckpt.capture_rng_state())
        if ctx.is_main:
            meta = {
                "step": at,
                "world_size": ctx.world_size,
                "config_hash": config_hash(run.resolved),
                "model_config": asdict(cfg.model),
                "vocab_size": tok.vocab_size,
                "plan": asdict(plan),
                "loop": loop,
                "loss_scale": scaler.state_dict(),
            }
            path = ckpt.save_checkpoint(
                run.path,
                at,
                model_state=model.state_dict(),
                optim_state=optim_state,
                loader_states=loaders,
                rng_states=rngs,
                meta=meta,
                keep_last=cfg.keep_checkpoints if cfg.keep_checkpoints > 0 else None,
            )
            log.info("checkpoint: %s", path)
        ctx.barrier()

    def weights_finite() -> bool:
        finite = torch.tensor([float(all(bool(p.isfinite().all()) for p in model.parameters()))], device=device)
        if ctx.distributed:
            tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
        return finite.item() == 1.0

    def last_good() -> str:
        good = ckpt.latest_checkpoint(run.path)
        return f"the last good checkpoint is {good}" if good is not None else "no earlier checkpoint exists"

    def save_if_finite(at: int) -> str:
        """After a non-finite loss: checkpoint the weights if they are still finite, and say where
        the last good state is."""
        if weights_finite():
            save(at)
            return f"the weights before this step are finite and saved as checkpoints/step_{at:06d}"
        return f"the weights already hold inf/nan (an update overflowed), so nothing was saved; {last_good()}"

    val_short_reported = False

    def evaluate_val(at: int) -> float:
        nonlocal val_short_reported
        from chatlm.evals.bpb import evaluate_bpb

        # pad_last: a val split smaller than eval_tokens (the embedded one on many GPUs: 8 row
        # groups, about 200k tokens) is evaluated whole, its last batch padded with ignored targets,
        # instead of dropping every partial batch (on 8 GPUs at B=16, T=2048: all of them, bpb inf)
        val = make_loader(
            [([v], s.weight) for (_, v), s in zip(splits, cfg.data.sources)],
            tok,
            B,
            T,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=device,
            buffer_size=cfg.data.doc_buffer,
            threads=cfg.data.tokenizer_threads,
            infinite=False,
            pad_last=True,
        )
        if n_fp8:  # nanochat evaluates in bf16: plain Linears sharing the weights, uncompiled (no recompiles)
            with fp8_disabled(model) as plain:
                bpb = evaluate_bpb(plain, val, token_bytes, max_steps=eval_steps)
        else:
            bpb = evaluate_bpb(train_model, val, token_bytes, max_steps=eval_steps)
        if val.drained and not val_short_reported:
            val_short_reported = True
            log.info(
                "val bpb covers the whole val split: it ran out before eval_tokens=%d (rank %d of %d "
                "evaluated %d tokens of the %d asked of each rank); lower eval_tokens or add val data "
                "for a fixed-size evaluation",
                cfg.eval_tokens,
                ctx.rank,
                ctx.world_size,
                val.packer.tokens_out,
                eval_steps * B * T,
            )
        loop["min_val_bpb"] = min(loop["min_val_bpb"], bpb)
        run.log_metrics(step=at, tokens=at * plan.total_batch_size, val_bpb=bpb)
        sinks.log({"val/bpb": bpb}, step=at)
        log.info("step %d | val bpb %.4f", at, bpb)
        return bpb

    def write_samples(at: int) -> None:
        if not ctx.is_main:
            return
        from chatlm.engine.generate import SAMPLE_PROMPTS, sample_texts

        with fp8_disabled(model) as plain:
            texts = sample_texts(plain, tok, SAMPLE_PROMPTS, max_new_tokens=16)
        lines = [f"{p!r} -> {t!r}" for p, t in zip(SAMPLE_PROMPTS, texts)]
        (run.path / "samples").mkdir(exist_ok=True)
        (run.path / "samples" / f"step_{at:06d}.txt").write_text("\n".join(lines) + "\n")
        log.info("samples at step %d:\n  %s", at, "\n  ".join(lines))

    # --- the loop
    exit_code = 1
    try:
        x, y = loader.next_batch()
        val_bpb = float("nan")
        last_loss = loop.get("last_loss", float("nan"))  # (a run resumed at its last step trains no step)
        params = list(model.parameters())
        with StopSignal() as stop:
            while True:
                last = step == N
                if due(step, cfg.eval_every, last, at_start=True):  # nanochat evaluates the fresh model too
                    val_bpb = evaluate_val(step)
                if due(step, cfg.sample_every, last):
                    write_samples(step)
                if last:
                    if step > start_step or found is None:  # (a finished run that is re-run saves nothing new)
                        save(step)
                    break
                if cfg.save_every > 0 and step > start_step and step % cfg.save_every == 0:
                    save(step)

                # one optimizer step: accum micro-batches, gradients synced inside optimizer.step()
                t0 = time.perf_counter()
                for _ in range(accum):
                    loss = train_model(x, y)
                    scaler.scale_loss(loss / accum).backward()
                    x, y = loader.next_batch()  # host work overlaps the queued device work
                lrm = lr_multiplier_from_config(cfg.schedule, step, N)
                optimizer.set_hyperparameters(
                    lrm,
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
                last_loss = loss.detach().item()  # the one host sync of the step
                if not math.isfinite(last_loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(f"loss is {last_loss} at step {step}; " + save_if_finite(step))
                if finite_grads:
                    optimizer.step()
                scaler.update(finite_grads)
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                step += 1

                if step == start_step + 1:  # nanochat: GC scans cost ~500 ms; freeze after warm-up
                    gc.collect()
                    gc.freeze()
                    gc.disable()
                elif step % 5000 == 0:
                    gc.collect()
                if step > start_step + 10 or N - start_step <= 10:
                    loop["train_time"] += dt
                beta = 0.9
                loop["last_loss"] = last_loss
                loop["smooth_loss"] = beta * loop["smooth_loss"] + (1 - beta) * last_loss
                smooth = loop["smooth_loss"] / (1 - beta**step)
                tok_s = plan.total_batch_size / dt
                util = mfu(plan.flops_per_token, tok_s, peak, ctx.world_size)
                if step % cfg.log_every == 0 or step == N:
                    row = {
                        "step": step,
                        "tokens": step * plan.total_batch_size,
                        "loss": last_loss,
                        "smooth_loss": smooth,
                        "lrm": lrm,
                        "dt_ms": 1000 * dt,
                        "tok_per_s": tok_s,
                        "mfu": util,
                        "train_time_s": loop["train_time"],
                    }
                    if device.type == "cuda":
                        row["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if dtype == torch.float16:
                        row["loss_scale"] = scaler.scale
                    run.log_metrics(**row)
                    sinks.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
                progress.update(step, loss=smooth, lrm=lrm, dt_ms=1000 * dt, tok_per_s=tok_s, mfu=util)
                profiler.step(step)

                if stop.agreed(ctx) or step == cfg.stop_at_step:
                    save(step)
                    if stop.signum is None:
                        raise Preempted(
                            f"stopped at stop_at_step={cfg.stop_at_step} with a checkpoint; run the same "
                            f"command again with hydra.run.dir={run.path} (resume=auto) to continue"
                        )
                    requeue = stop.requeue_handler
                    then = (
                        "requeueing the job"
                        if requeue
                        else f"run the same command again with hydra.run.dir={run.path} (resume=auto) to continue"
                    )
                    raise Preempted(
                        f"stopped by {stop.describe()} after step {step} with a checkpoint; {then}",
                        signum=stop.signum,
                        requeue=requeue,
                    )
        final = {
            "steps": N,
            "tokens": N * plan.total_batch_size,
            "val_bpb": val_bpb,
            "min_val_bpb": loop["min_val_bpb"],
            "train_loss": last_loss,
            "train_time_s": round(loop["train_time"], 3),
        }
        if device.type == "cuda":
            final["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        sinks.summary(final)
        exit_code = 0
        return final
    finally:
        profiler.finish()  # (a run shorter than the profiled window still writes what it saw)
        gc.enable()
        progress.close()
        sinks.close(exit_code=exit_code)


def main() -> None:
    run_stage("train", train)


if __name__ == "__main__":
    main()
