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
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from chatlm.config import ConfigError, TrainConfig
from chatlm.data.loader import rank_loader, train_sets, val_sets
from chatlm.data.sources import prepare_sources
from chatlm.model.fp8 import fp8_disabled
from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime import lineage
from chatlm.runtime.flops import peak_flops
from chatlm.runtime.model_loading import load_weights, tokenizer_record
from chatlm.runtime.rundir import Run, config_hash
from chatlm.tokenizer import Tokenizer, tokenizer_dir
from chatlm.training.batches import RepeatBatches
from chatlm.training.build import build_training_model, pretrain_trainer
from chatlm.training.checkpointing import restore, resume_source
from chatlm.training.loop_hooks import loop_hooks
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


# ----------------------------------------------------------------------------------------------
# the run


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
    """The pretraining hooks (chatlm.training.loop_hooks), with CORE when asked for."""
    tok_record = tokenizer_record(tok, tokenizer_dir(cfg.tokenizer, cfg.paths))
    chain = lineage.fresh(tok_record)
    if cfg.init_from:
        step_dir = ckpt.find_checkpoint(cfg.init_from)
        chain = lineage.extend(step_dir, ckpt.read_meta(step_dir))
    run.update_record(lineage=chain)
    meta = {
        "stage": cfg.stage,  # which stage made the weights: chat picks its template by it
        "config_hash": config_hash(run.resolved),
        "model_config": asdict(cfg.model),
        "vocab_size": tok.vocab_size,
        "plan": asdict(plan),
        "tokenizer": tok_record,
        "init_from": cfg.init_from,
        "lineage": chain,  # tokenizer -> ... -> the checkpoint these weights started from
    }
    evals = []
    if cfg.core_metric_every > 0:
        evals.append((cfg.core_metric_every, _core(cfg, run, tok, plan, built), ("core", "core_partial")))
    d = shlex.quote(str(run.path))
    return loop_hooks(
        cfg,
        run,
        tok,
        built,
        val_bpb=_val_bpb(cfg, run, tok, val_sets(shard_dirs, cfg.data), plan, built),
        meta=meta,
        flops_per_token=plan.flops_per_token,
        total_steps=plan.num_iterations,
        resumed_at=resumed_at,
        evals=evals,
        next_steps=[
            f"python -m chatlm.eval ckpt={d}",
            f"python -m chatlm.sft init_from={d}   (fine-tune it into a chat model)",
            f"python -m chatlm.train <same overrides> init_from={d}   (start a new run from these weights)",
        ],
    )


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
    found = resume_source(cfg.resume, run.path)
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
