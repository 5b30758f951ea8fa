"""Supervised fine-tuning (nanochat's chat_sft, spec §7), assembled from the shared parts.

Reading order: `sft` finds the base checkpoint (`init_from`) and its tokenizer, builds the mixture
(chatlm.data.chat.mixture), renders and packs it (chatlm.data.chat.rows), derives the plan (batch,
accumulation, one pass = the horizon), builds the model as training does and loads the base
weights, then the optimizer state when it matches (with fresh learning rates), and hands a
`Trainer` the loop hooks: validation bits-per-byte of the held-out conversations' assistant
tokens, the chat evals, chat samples, checkpoints, logging and stop signals.

What differs from pretraining is only the data, the learning rates (the optim group's, not scaled
by the batch, times `init_lr_frac`; Muon weight decay 0) and the schedule (no warmup, the last
half decays to 0; conf/sft.yaml). Resume, preemption and sweeps work exactly as in pretraining.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from chatlm.config import ConfigError
from chatlm.config.sft import SFTConfig
from chatlm.data.chat.mixture import Mixture, build_mixture
from chatlm.data.chat.rows import Rendered, SFTBatches, batches_of, padding_fraction, rank_rows, render_all
from chatlm.model.fp8 import fp8_disabled
from chatlm.optim import build_optimizer
from chatlm.optim.loss_scale import LossScaler
from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime.model_loading import (
    load_weights,
    tokenizer_record,
)
from chatlm.runtime.rundir import Run, config_hash
from chatlm.training.build import TrainingSchedule, build_training_model
from chatlm.training.checkpointing import restore, resume_source
from chatlm.training.loop_hooks import loop_hooks
from chatlm.training.source import Base, find_base
from chatlm.training.trainer import Trainer

log = logging.getLogger("chatlm")


@dataclass(frozen=True)
class SFTPlan:
    seq_len: int
    device_batch_size: int
    world_size: int
    grad_accum: int
    total_batch_size: int
    num_iterations: int
    rows_per_rank: int  # fewest rows of any rank (one pass)
    padding_fraction: float  # padding slots / all slots of this rank's rows
    conversations: int
    trained_tokens: int  # assistant tokens (mask 1) of one pass
    truncated: int
    dropped: int


def plan_sft(cfg: SFTConfig, base: Base, rendered: Rendered, rows: list[list[list[int]]], rank: int) -> SFTPlan:
    T = base.model.sequence_len
    B, W = cfg.hardware.device_batch_size, len(rows)
    total = cfg.total_batch_size
    if total == -1:
        total = int((base.meta.get("plan") or {}).get("total_batch_size") or B * T * W)
    if total % (T * W):
        raise ConfigError(
            "total_batch_size",
            f"{total:,} tokens per step is not a multiple of sequence_len x world_size = {T} x {W} = {T * W:,}",
        )
    fitting = max(b for b in range(1, B + 1) if total % (b * T * W) == 0)
    if fitting != B:  # e.g. the base run's small step on a machine whose preset batch is larger
        log.info(
            "device batch %d rows (hardware.device_batch_size=%d does not divide the %s-token step into %d-token rows "
            "on %d ranks)",
            fitting,
            B,
            f"{total:,}",
            T,
            W,
        )
        B = fitting
    accum = total // (B * T * W)
    fewest = min(len(r) for r in rows)
    steps = cfg.steps if cfg.steps > 0 else fewest // (B * accum)
    if steps < 1 or fewest < B:
        raise ConfigError(
            "mixture",
            f"one pass packs {fewest} rows per rank, fewer than one step needs ({B} rows x {accum} accumulation): "
            "add conversations, raise the sources' epochs or lower total_batch_size",
        )
    s = rendered.stats
    return SFTPlan(
        seq_len=T,
        device_batch_size=B,
        world_size=W,
        grad_accum=accum,
        total_batch_size=total,
        num_iterations=steps,
        rows_per_rank=fewest,
        padding_fraction=round(padding_fraction(rendered, rows[rank], T + 1), 4),
        conversations=s.conversations,
        trained_tokens=s.trained_tokens,
        truncated=s.truncated,
        dropped=s.dropped,
    )


def describe_sft_plan(plan: SFTPlan, mixture: Mixture) -> list[str]:
    return [
        *mixture.describe(),
        f"packed: {plan.conversations:,} conversations ({plan.trained_tokens:,} assistant tokens), "
        f"{plan.truncated} truncated at a turn, {plan.dropped} dropped as too long | {plan.rows_per_rank:,} rows "
        f"of {plan.seq_len} per rank, {100 * plan.padding_fraction:.1f}% padding",
        f"batch {plan.total_batch_size:,} tokens/step = {plan.device_batch_size} x {plan.seq_len} x "
        f"{plan.world_size} ranks x {plan.grad_accum} accumulation | {plan.num_iterations:,} steps",
    ]


def load_base_optimizer(optimizer: Any, base: Base, device: Any) -> str:
    """The base run's optimizer state (momenta, Muon's final weight decay) with this run's fresh
    learning rates, as nanochat; returns what happened, for the log and run.json."""
    try:
        state = ckpt.load_checkpoint(base.step_dir, map_location=device, parts=("optim",))["optim"]
    except ckpt.CheckpointError as e:
        return f"fresh: the base checkpoint's optimizer state cannot be read ({e})"
    fresh = [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]
    try:
        optimizer.load_full_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        return f"fresh: the base optimizer does not match ({e})"
    for group, (lr, initial) in zip(optimizer.param_groups, fresh):
        group["lr"], group["initial_lr"] = lr, initial
    return f"loaded from {base.step_dir} (learning rates fresh)"


def _val_bpb(cfg: SFTConfig, run: Run, base: Base, built: Any, plan: SFTPlan, val: Optional[Rendered]):
    """Bits per byte of the held-out conversations' assistant tokens (a collective), or None."""
    if val is None or len(val) == 0:
        log.warning("no held-out conversations (mixture.val_fraction=0 or tiny sources): no validation")
        return None
    from chatlm.evals.bpb import evaluate_bpb

    ctx, cap, tok = run.ctx, plan.seq_len + 1, base.tokenizer
    rows = rank_rows(val, cap, cfg.buffer_size, ctx.rank, ctx.world_size)
    token_bytes = tok.token_bytes_tensor(ctx.device)
    steps = max(1, cfg.eval_tokens // (plan.device_batch_size * plan.seq_len * ctx.world_size))  # nanochat

    def evaluate() -> float:
        batches = batches_of(val, rows, plan.device_batch_size, cap, tok.bos_id, ctx.device)
        with fp8_disabled(built.model) as plain:
            return evaluate_bpb(plain if built.fp8_linears else built.train_model, batches, token_bytes, steps)

    return evaluate


def _chat_samples(run: Run, tok: Any, model: Any) -> Callable[[int], None]:
    def write(step: int) -> None:
        if not run.is_main:
            return
        from chatlm.engine.generate import CHAT_SAMPLE_QUESTIONS, chat_replies

        with fp8_disabled(model) as plain:
            replies = chat_replies(plain, tok, CHAT_SAMPLE_QUESTIONS)
        lines = [f"{q!r} -> {r!r}" for q, r in zip(CHAT_SAMPLE_QUESTIONS, replies)]
        (run.path / "samples").mkdir(exist_ok=True)
        (run.path / "samples" / f"step_{step:06d}.txt").write_text("\n".join(lines) + "\n")
        log.info("samples at step %d:\n  %s", step, "\n  ".join(lines))

    return write


@dataclass
class SFTData:
    mixture: Mixture
    rendered: Rendered  # the training conversations of one pass
    val: Optional[Rendered]  # the held-out ones
    rows: list[list[list[int]]]  # every rank's rows
    plan: SFTPlan


def prepare_data(cfg: SFTConfig, base: Base, ctx: Any) -> SFTData:
    """Build, render and pack the mixture on every rank (deterministic: all ranks agree) and plan
    the run from it; the sizes, padding and horizon are logged."""
    tok, cap = base.tokenizer, base.model.sequence_len + 1
    mixture = build_mixture(cfg.mixture, cfg.chat_eval.data_dir)
    rendered = render_all(tok, mixture.train, cap, cfg.mixture.overlong)
    val = render_all(tok, mixture.val, cap, cfg.mixture.overlong) if mixture.val else None
    rows = [rank_rows(rendered, cap, cfg.buffer_size, r, ctx.world_size) for r in range(ctx.world_size)]
    plan = plan_sft(cfg, base, rendered, rows, ctx.rank)
    for line in describe_sft_plan(plan, mixture):
        log.info("%s", line)
    return SFTData(mixture, rendered, val, rows, plan)


def sft_trainer(cfg: SFTConfig, run: Run, base: Base, data: SFTData, built: Any) -> Trainer:
    """The Trainer of an SFT run: nanochat's optimizer settings and schedule over `data`'s rows."""
    ctx, policy, plan = run.ctx, run.policy, data.plan
    optimizer = build_optimizer(
        built.model,
        cfg.optim,
        built.model.dims.n_embd,
        1.0,  # nanochat's SFT takes the learning rates as given: no batch-size scaling
        0.0,  # and no Muon weight decay (a loaded base state brings its own, ~0 at its end)
        compute_dtype=policy.compute_dtype,
        compile=policy.compile,
    )
    cap, bos = base.model.sequence_len + 1, base.tokenizer.bos_id
    return Trainer(
        model=built.model,
        train_model=built.train_model,
        optimizer=optimizer,
        batches=SFTBatches(data.rendered, data.rows[ctx.rank], plan.device_batch_size, cap, bos, ctx.device),
        total_steps=plan.num_iterations,
        grad_accum=plan.grad_accum,
        tokens_per_step=plan.total_batch_size,
        ctx=ctx,
        schedule=TrainingSchedule(cfg.schedule, cfg.optim, None, lr_scale=cfg.init_lr_frac),
        scaler=LossScaler(enabled=policy.compute_dtype == torch.float16),
    )


def sft(cfg: SFTConfig, run: Run) -> dict:
    ctx = run.ctx
    base = find_base(cfg.init_from, cfg.tokenizer_dir, "SFT")
    tok = base.tokenizer
    log.info(
        "fine-tuning %s (stage %s, step %s)", base.step_dir, base.meta.get("stage", "train"), base.meta.get("step")
    )
    data = prepare_data(cfg, base, ctx)
    plan, chain = data.plan, base.lineage()
    run.record_derived(
        **asdict(plan), model_name=base.model.name, mixture_sizes=[asdict(r) for r in data.mixture.reports]
    )
    built = build_training_model(base.model, tok.vocab_size, run.policy, ctx.device)
    trainer = sft_trainer(cfg, run, base, data, built)
    found = resume_source(cfg.resume, run.path)
    if found is not None:
        restore(trainer, found, model_cfg=base.model, tokenizer=tok)
        optimizer_from = (ckpt.read_meta(found).get("sft") or {}).get("optimizer", "restored with the run")
    else:
        load_weights(built.model, base.step_dir, model_cfg=base.model, tokenizer=tok, map_location=ctx.device)
        optimizer_from = load_base_optimizer(trainer.optimizer, base, ctx.device) if cfg.load_optimizer else "fresh"
    log.info("weights from %s | optimizer state: %s", base.step_dir, optimizer_from)
    record = {"source": chain[-1], "optimizer": optimizer_from, "mixture": cfg.mixture.name}
    run.update_record(lineage=chain, sft=record)
    meta = {
        "stage": cfg.stage,  # chat picks the chat template by it
        "config_hash": config_hash(run.resolved),
        "model_config": asdict(base.model),
        "vocab_size": tok.vocab_size,
        "plan": asdict(plan),
        "tokenizer": tokenizer_record(tok),
        "init_from": str(base.step_dir),
        "lineage": chain,  # tokenizer -> base -> ... -> the checkpoint fine-tuned
        "sft": record,  # a resumed run reads where its optimizer state first came from
    }
    d = shlex.quote(str(run.path))
    trainer.hooks = loop_hooks(
        cfg,
        run,
        tok,
        built,
        val_bpb=_val_bpb(cfg, run, base, built, plan, data.val),
        meta=meta,
        flops_per_token=built.model.flops_per_token(),
        total_steps=plan.num_iterations,
        resumed_at=trainer.state.step if found is not None else None,
        samples=_chat_samples(run, tok, built.model),
        next_steps=[f"python -m chatlm.chat ckpt={d}", f"python -m chatlm.eval ckpt={d} eval=chat"],
    )
    return trainer.fit()
