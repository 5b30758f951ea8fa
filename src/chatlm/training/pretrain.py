"""Pretraining (nanochat's base_train), assembled from the shared parts.

Reading order: `pretrain` prepares the data and tokenizer, derives the plan (chatlm.training.plan),
builds the model and optimizer (chatlm.training.build), resumes or initializes from a checkpoint,
and hands a `Trainer` its hooks: validation bits-per-byte, samples, checkpoints, logging,
profiling and stop signals. Everything a run produces goes into its run directory.

Resuming: with `resume=auto` (the default) a run directory that already has checkpoints continues
from `checkpoints/latest`, exactly: model, optimizer, data loader position and RNG are restored, so
the losses match an uninterrupted run (bitwise on CPU). SIGTERM / SIGUSR1 (Slurm preemption and
time limits) and Ctrl-C write a checkpoint at the end of the current step and stop.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from chatlm.config import ConfigError, TrainConfig
from chatlm.data.loader import rank_loader, train_sets, val_sets
from chatlm.data.sources import prepare_sources
from chatlm.model.fp8 import fp8_disabled
from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime.flops import peak_flops
from chatlm.runtime.metric_logger import MetricLogger
from chatlm.runtime.model_loading import load_weights, tokenizer_record
from chatlm.runtime.profile import StepProfiler
from chatlm.runtime.rundir import Run, config_hash, resume_hint
from chatlm.runtime.sinks import format_duration
from chatlm.tokenizer import Tokenizer, tokenizer_dir
from chatlm.training.batches import RepeatBatches
from chatlm.training.build import build_training_model, pretrain_trainer
from chatlm.training.checkpointing import CheckpointHook, restore
from chatlm.training.hooks import EvalHook, GCHook, Hook, LogHook, Periodic, ProfilerHook, StopHook, ValidationHook
from chatlm.training.plan import Plan, describe_plan, plan_run

log = logging.getLogger("chatlm")


# ----------------------------------------------------------------------------------------------
# data and tokenizer


def data_dirs(cfg: Any, run: Run) -> list[Path]:
    """The shard directory of every data source (chatlm.data.sources.prepare_sources)."""
    return prepare_sources(cfg.data, cfg.paths, run.ctx)


def load_or_train_tokenizer(cfg: Any, run: Run, shard_dirs: list[Path]) -> Tokenizer:
    """The configured tokenizer; trained here first (main rank) when `auto_tokenizer` is set."""
    ctx = run.ctx
    path = tokenizer_dir(cfg.tokenizer, cfg.paths)
    if not (path / "tokenizer.json").exists() and cfg.auto_tokenizer:
        if ctx.is_main:
            from chatlm.tokenizer.build import train_with_progress
            from chatlm.tokenizer.training_text import training_texts

            log.info(
                "no tokenizer at %s: training %s (vocab %d) on the train shards first (auto_tokenizer=true)",
                path,
                cfg.tokenizer.name,
                cfg.tokenizer.vocab_size,
            )
            sets = train_sets(shard_dirs, cfg.data)
            tok = train_with_progress(training_texts(sets, cfg.tokenizer.max_chars), cfg.tokenizer)
            tok.save(path)
        ctx.barrier()
    return Tokenizer.load(path)


# ----------------------------------------------------------------------------------------------
# validation and samples


def _val_bpb(cfg: TrainConfig, run: Run, tok: Tokenizer, val_files: list, plan: Plan, built: Any) -> Any:
    """The validation callable: fp8 models are evaluated in bf16 through plain Linears sharing the
    weights, uncompiled (nanochat); others through the compiled model."""
    from chatlm.evals.bpb import ValidationBpb

    bpb = ValidationBpb(val_files, tok, plan.device_batch_size, plan.seq_len, cfg.eval_tokens, cfg.data, run.ctx)
    if not built.fp8_linears:
        return lambda: bpb(built.train_model)

    def plain_bpb() -> float:
        with fp8_disabled(built.model) as plain:
            return bpb(plain)

    return plain_bpb


def _core(cfg: TrainConfig, run: Run, tok: Tokenizer, plan: Plan, built: Any) -> Any:
    """CORE of the current weights (uncompiled, fp8 off): the eval stage's code and its data, read
    and checked here, before the first step."""
    from chatlm.evals.core import evaluate_core, flat_scores, prepare_core
    from chatlm.evals.scoring import batch_tokens

    bundle = cfg.core_bundle or str(Path(cfg.paths.cache_dir).expanduser() / "evals" / "core")
    prepared = prepare_core(bundle, key="core_bundle")
    log.info("CORE every %d steps: %d tasks from %s", cfg.core_metric_every, len(prepared), bundle)

    def evaluate() -> dict:
        with fp8_disabled(built.model) as plain:
            summary, results = evaluate_core(
                plain,
                tok,
                prepared,
                cfg.core_metric_max_per_task,
                batch_size=plan.device_batch_size,
                max_batch_tokens=batch_tokens(-1, run.ctx.device),
                ctx=run.ctx,
            )
        return flat_scores(summary, results)

    return evaluate


def _chat(cfg: TrainConfig, run: Run, tok: Tokenizer, built: Any) -> Any:
    """The chat evals of the current weights (uncompiled, fp8 off), through the eval stage's code;
    their data read and checked here, before the first step."""
    from chatlm.evals import chat
    from chatlm.evals.scoring import batch_tokens

    suite = cfg.chat_eval
    rows = {t: chat.prepare_task(t, suite.data_dir, suite.max_examples) for t in suite.tasks}
    log.info("chat evals every %d steps: %s from %s", cfg.chat_metric_every, ", ".join(suite.tasks), suite.data_dir)
    tokens = batch_tokens(suite.max_batch_tokens, run.ctx.device)

    def evaluate() -> dict:
        with fp8_disabled(built.model) as plain:
            return {
                t: chat.evaluate_task(plain, tok, t, rows[t], suite, cfg.seed, tokens, run.ctx).accuracy for t in rows
            }

    return evaluate


class RunSummary(Hook):
    """At the end of a run (main rank): what it achieved, where it is, and what to run next."""

    def __init__(self, run: Run):
        self.run = run
        self.t0 = time.time()

    def on_end(self, trainer: Any, final: dict) -> None:
        if not self.run.is_main:
            return
        d = shlex.quote(str(self.run.path))
        log.info(
            "done: %d steps, %s tokens in %s | train loss %.4f | val bpb %.4f (best %.4f)\n  run directory: %s\n"
            "next:\n  chatlm runs show %s\n  chatlm runs plot %s --metric val_bpb --out val_bpb.png\n"
            "  python -m chatlm.eval ckpt=%s\n  python -m chatlm.train <same overrides> init_from=%s   "
            "(start a new run from these weights)",
            final["steps"],
            f"{final['tokens']:,}",
            format_duration(time.time() - self.t0),
            final["train_loss"],
            final.get("val_bpb", math.nan),
            final.get("min_val_bpb", math.nan),
            self.run.path,
            d,
            d,
            d,
            d,
        )


class SampleWriter:
    """nanochat's samples: 7 fixed prompts, greedy, 16 tokens, into samples/step_<N>.txt (main rank)."""

    def __init__(self, run: Run, tok: Tokenizer, model: Any):
        self.run, self.tok, self.model = run, tok, model

    def __call__(self, step: int) -> None:
        if not self.run.is_main:
            return
        from chatlm.engine.generate import SAMPLE_PROMPTS, sample_texts

        with fp8_disabled(self.model) as plain:
            texts = sample_texts(plain, self.tok, SAMPLE_PROMPTS, max_new_tokens=16)
        lines = [f"{p!r} -> {t!r}" for p, t in zip(SAMPLE_PROMPTS, texts)]
        (self.run.path / "samples").mkdir(exist_ok=True)
        (self.run.path / "samples" / f"step_{step:06d}.txt").write_text("\n".join(lines) + "\n")
        log.info("samples at step %d:\n  %s", step, "\n  ".join(lines))


# ----------------------------------------------------------------------------------------------
# the run


def _resume_source(cfg: TrainConfig, run: Run) -> Optional[Path]:
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(run.path)
    if cfg.resume != "never":
        return ckpt.find_checkpoint(cfg.resume)
    return None


def _plan(cfg: TrainConfig, run: Run, tok: Tokenizer) -> Plan:
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
        raise ConfigError("model.vocab_size", f"is {cfg.model.vocab_size} but the tokenizer has {tok.vocab_size} ids")
    plan = plan_run(cfg, tok.vocab_size, run.ctx.world_size)
    run.record_derived(**asdict(plan), tokenizer_dir=str(tokenizer_dir(cfg.tokenizer, cfg.paths)))
    for line in describe_plan(plan):
        log.info("%s", line)
    if run.is_main:
        _log_estimate(cfg, run, plan)
    if cfg.schedule.warmup_steps >= plan.num_iterations:
        log.warning(
            "schedule.warmup_steps=%d is not shorter than the run's %d steps: the learning rate never reaches "
            "its peak (set schedule.warmup_steps lower)",
            cfg.schedule.warmup_steps,
            plan.num_iterations,
        )
    return plan


def _log_estimate(cfg: TrainConfig, run: Run, plan: Plan) -> None:
    from chatlm.training.estimate import describe_estimate, estimate

    device = run.ctx.device
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "", cfg.hardware.peak_flops)
    est = estimate(plan, device, run.policy.compute_dtype, peak)
    run.record_derived(estimated_train_s=est.seconds, estimated_memory_gib=round(est.memory_bytes / 2**30, 3))
    for line in describe_estimate(est):
        (log.warning if line.startswith("warning:") else log.info)("%s", line.removeprefix("warning: "))


def _hooks(
    cfg: TrainConfig, run: Run, tok: Tokenizer, plan: Plan, built: Any, shard_dirs: list, resumed_at: Optional[int]
) -> list:
    """The pretraining hooks, in the order the trainer calls them (see chatlm.training.hooks)."""
    ctx = run.ctx
    metrics = MetricLogger(run, cfg.logger, total_steps=plan.num_iterations, resume_step=resumed_at)
    val_files = val_sets(shard_dirs, cfg.data)
    meta = {
        "stage": cfg.stage,  # which stage made the weights: chat picks its template by it
        "config_hash": config_hash(run.resolved),
        "model_config": asdict(cfg.model),
        "vocab_size": tok.vocab_size,
        "plan": asdict(plan),
        "tokenizer": tokenizer_record(tok, tokenizer_dir(cfg.tokenizer, cfg.paths)),
        "init_from": cfg.init_from,
    }
    checkpoint = CheckpointHook(
        run, every=cfg.save_every, meta=meta, tokenizer=tok, keep=cfg.keep_checkpoints, fresh_run=resumed_at is None
    )
    device = ctx.device
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "", cfg.hardware.peak_flops)
    start = (resumed_at or 0) + cfg.profile_start
    profiler = StepProfiler(run.path, ctx.rank, start, cfg.profile_steps, device)
    evals = []
    if cfg.core_metric_every > 0:
        evals.append(
            EvalHook(cfg.core_metric_every, _core(cfg, run, tok, plan, built), metrics, ("core", "core_partial"))
        )
    if cfg.chat_metric_every > 0:
        evals.append(EvalHook(cfg.chat_metric_every, _chat(cfg, run, tok, built), metrics, tuple(cfg.chat_eval.tasks)))
    return [
        GCHook(),
        ValidationHook(cfg.eval_every, _val_bpb(cfg, run, tok, val_files, plan, built), metrics),
        *evals,
        Periodic(cfg.sample_every, SampleWriter(run, tok, built.model)),
        checkpoint,
        LogHook(
            metrics,
            cfg.log_every,
            plan.flops_per_token,
            peak,
            ctx.world_size,
            fp16=run.policy.compute_dtype == torch.float16,
        ),
        ProfilerHook(profiler),
        StopHook(checkpoint, cfg.stop_at_step, resume_hint(run)),
        RunSummary(run),
    ]


def pretrain(cfg: TrainConfig, run: Run) -> dict:
    ctx, policy = run.ctx, run.policy
    shard_dirs = data_dirs(cfg, run)
    tok = load_or_train_tokenizer(cfg, run, shard_dirs)
    plan = _plan(cfg, run, tok)
    built = build_training_model(cfg.model, tok.vocab_size, policy, ctx.device)
    log.info(
        "attention backend: %s | compute dtype %s (%s) | compile %s | fp8 linears %d",
        built.backend,
        policy.dtype_name,
        policy.dtype_reason,
        policy.compile,
        built.fp8_linears,
    )
    run.record_derived(attention_backend=built.backend, fp8_linears=built.fp8_linears)
    batches: Any = rank_loader(
        train_sets(shard_dirs, cfg.data), tok, plan.device_batch_size, plan.seq_len, ctx, cfg.data
    )
    if cfg.overfit_batches > 0:
        batches = RepeatBatches(batches, cfg.overfit_batches)
    trainer = pretrain_trainer(cfg, built, plan, batches, ctx, policy)
    found = _resume_source(cfg, run)
    if found is not None:
        restore(trainer, found, model_cfg=cfg.model, tokenizer=tok)
    elif cfg.init_from:
        meta = load_weights(built.model, cfg.init_from, model_cfg=cfg.model, tokenizer=tok, map_location=ctx.device)
        log.info("initialized weights from %s", meta["checkpoint"])
    resumed_at = trainer.state.step if found is not None else None
    trainer.hooks = _hooks(cfg, run, tok, plan, built, shard_dirs, resumed_at)
    return trainer.fit()


def describe_run(cfg: TrainConfig) -> str:
    """`python -m chatlm.train --plan`: the derived sizes, batch and horizon, and an estimate of the
    run's time and memory on this machine, without data, tokenizer or training."""
    from chatlm.training.estimate import describe_estimate, estimate_run

    path = tokenizer_dir(cfg.tokenizer, cfg.paths)
    vocab = cfg.model.vocab_size or (
        Tokenizer.load(path).vocab_size if (path / "tokenizer.json").exists() else cfg.tokenizer.vocab_size
    )
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    plan = plan_run(cfg, vocab, world)
    lines = describe_plan(plan) + describe_estimate(estimate_run(cfg, plan))
    return "\n".join(lines)
