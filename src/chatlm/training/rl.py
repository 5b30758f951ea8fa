"""RL on verifiable rewards (nanochat's chat_rl, spec §8), assembled from the shared parts.

Reading order: `prepare` finds the SFT checkpoint and its tokenizer (as SFT finds its base),
builds the task (`chatlm.rollouts.tasks`), renders its prompts and derives the plan;
`build_trainer` builds the model as training does, a fresh optimizer (nanochat's RL learning rates
times `init_lr_frac`, no Muon weight decay), the sampler over the live weights and the shared
`Trainer` with the token-level REINFORCE loss (`chatlm.rollouts.objective`) over a rollout stream
(`chatlm.rollouts.sampling`): each step every rank samples `rl.num_samples` completions for each of
its prompts, rewards them and takes advantages, when the step's first micro-batch is used (after
the previous update: on-policy). `rl` loads the weights or resumes, and adds to the shared loop
hooks a per-step rollout log and pass@k of the eval slice (`chatlm.rollouts.evaluation`).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from dataclasses import asdict, dataclass
from typing import Any

import torch

from chatlm.config import ConfigError
from chatlm.config.rl import RLConfig
from chatlm.engine.engine import SamplingParams
from chatlm.model.fp8 import fp8_disabled
from chatlm.optim import build_optimizer
from chatlm.optim.loss_scale import LossScaler
from chatlm.rollouts.evaluation import evaluate_pass_at_k
from chatlm.rollouts.objective import policy_gradient_loss
from chatlm.rollouts.sampling import RolloutBatches, Sampler, Slot, StepRollouts
from chatlm.rollouts.tasks import ProblemTask, build_task
from chatlm.runtime.model_loading import load_weights, tokenizer_record
from chatlm.runtime.rundir import Run, config_hash
from chatlm.tokenizer.chat_format import render_for_completion
from chatlm.training.build import TrainingSchedule, build_training_model
from chatlm.training.checkpointing import restore, resume_source
from chatlm.training.hooks import EvalHook, Hook, LogHook
from chatlm.training.loop_hooks import loop_hooks
from chatlm.training.source import Base, find_base
from chatlm.training.trainer import Trainer

log = logging.getLogger("chatlm")


@dataclass(frozen=True)
class RLPlan:
    world_size: int
    examples_per_rank: int
    num_samples: int
    micro_batches: int  # per step and rank (the Trainer's grad_accum)
    micro_batch_rows: int  # hardware.device_batch_size
    num_iterations: int
    train_problems: int  # whose prompt leaves room for rl.max_new_tokens
    eval_problems: int
    dropped_prompts: int  # too long for the context with rl.max_new_tokens
    max_len: int  # the engine's context: longest prompt + rl.max_new_tokens (at most sequence_len)
    sampling_slots: int


def plan_rl(cfg: RLConfig, task: ProblemTask, prompts: list[list[int]], eval_len: int, seq_len: int, world: int):
    s = cfg.rl
    if s.examples_per_step % world:
        raise ConfigError(
            "rl.examples_per_step", f"{s.examples_per_step} prompts per step do not split over {world} ranks"
        )
    fits = [i for i, p in enumerate(prompts) if len(p) + s.max_new_tokens <= seq_len]
    if not fits:
        raise ConfigError(
            "rl.max_new_tokens",
            f"no prompt of task {task.name!r} leaves room for {s.max_new_tokens} new tokens in the model's "
            f"context of {seq_len}",
        )
    steps = cfg.steps if cfg.steps > 0 else len(fits) // s.examples_per_step
    if steps < 1:
        raise ConfigError(
            "rl_task", f"{len(fits)} training problems make no step of rl.examples_per_step={s.examples_per_step}"
        )
    per_rank = s.examples_per_step // world
    rows = cfg.hardware.device_batch_size
    plan = RLPlan(
        world_size=world,
        examples_per_rank=per_rank,
        num_samples=s.num_samples,
        micro_batches=-(-per_rank * s.num_samples // rows),
        micro_batch_rows=rows,
        num_iterations=steps,
        train_problems=len(fits),
        eval_problems=len(task.eval_split()),
        dropped_prompts=len(prompts) - len(fits),
        max_len=min(seq_len, max([len(prompts[i]) for i in fits] + [eval_len]) + s.max_new_tokens),
        sampling_slots=s.device_batch_size,
    )
    return plan, fits


class RolloutLog(Hook):
    """After each step: the rollouts' reward and lengths and the split of the step's time between
    sampling and training (metrics.jsonl rows of section `rl`, and a log line, every `every` steps)."""

    def __init__(self, rollouts: StepRollouts, metrics: Any, every: int):
        self.rollouts, self.metrics, self.every = rollouts, metrics, every
        self.last: dict = {}

    def after_step(self, trainer: Any, result: Any) -> None:
        row = self.last = self.rollouts.stats.metrics(result.dt)
        if result.step % self.every == 0 or result.step == trainer.total_steps:
            self.metrics.log(result.step, row, section="rl", context={"tokens": result.tokens})
            log.info(
                "step %d | reward %.4f | length %.1f | sampling %.2fs (%.0f tok/s) | training %.2fs (%.0f tok/s)",
                *(result.step, row["reward"], row["completion_len"], row["sampling_s"], row["sampling_tok_per_s"]),
                *(row["train_s"], row["train_tok_per_s"]),
            )

    def final_metrics(self, trainer: Any) -> dict:
        return {k: self.last[k] for k in ("reward", "completion_len") if k in self.last}


def _samples(run: Run, rollouts: StepRollouts):
    def write(step: int) -> None:
        if run.is_main and rollouts.rollouts:
            (run.path / "samples").mkdir(exist_ok=True)
            (run.path / "samples" / f"step_{step:06d}.txt").write_text("\n".join(rollouts.sample_lines()) + "\n")

    return write


@dataclass
class Prepared:
    """What `rl` reads before building anything: the checkpoint, the task, its prompts and the plan."""

    base: Base
    task: ProblemTask
    problems: list  # the training problems whose prompt fits
    prompts: list[list[int]]
    plan: RLPlan


def prepare(cfg: RLConfig, run: Run) -> Prepared:
    s = cfg.rl
    base = find_base(cfg.init_from, cfg.tokenizer_dir, "RL")
    tok, seq_len = base.tokenizer, base.model.sequence_len
    stage = base.meta.get("stage", "train")
    log.info("RL of %s (stage %s, step %s)", base.step_dir, stage, base.meta.get("step"))
    if stage not in ("sft", "rl"):
        log.warning("init_from is a %s checkpoint, not a chat model: fine-tune it with chatlm.sft first", stage)
    task = build_task(cfg.rl_task, s.format_reward, cfg.chat_eval.data_dir, s.eval_examples)
    prompts = [render_for_completion(tok, p.conversation()) for p in task.prompts()]
    eval_len = max((len(render_for_completion(tok, p.conversation())) for p in task.eval_split()), default=0)
    if eval_len + s.max_new_tokens > seq_len:
        raise ConfigError(
            "rl.max_new_tokens",
            f"an eval prompt of {eval_len} tokens + {s.max_new_tokens} new tokens exceed the model's context of "
            f"{seq_len}",
        )
    plan, fits = plan_rl(cfg, task, prompts, eval_len, seq_len, run.ctx.world_size)
    log.info(
        "task %s: %d training problems (%d too long dropped), %d eval problems%s | %d prompts x %d samples per "
        "step on %d ranks, %d micro-batches of %d rows | %d steps",
        task.name, plan.train_problems, plan.dropped_prompts, plan.eval_problems,
        "".join(f"; {note}" for note in task.notes), s.examples_per_step, s.num_samples, plan.world_size,
        plan.micro_batches, plan.micro_batch_rows, plan.num_iterations,
    )  # fmt: skip
    run.record_derived(**asdict(plan))
    return Prepared(base, task, [task.prompts()[i] for i in fits], [prompts[i] for i in fits], plan)


def build_trainer(cfg: RLConfig, run: Run, prep: Prepared) -> tuple[Trainer, Any, StepRollouts]:
    """The model, its optimizer, the sampler over its live weights, the rollout stream and the Trainer."""
    ctx, policy, s, tok = run.ctx, run.policy, cfg.rl, prep.base.tokenizer
    built = build_training_model(prep.base.model, tok.vocab_size, policy, ctx.device)
    optimizer = build_optimizer(
        built.model,
        cfg.optim,
        built.model.dims.n_embd,
        1.0,  # nanochat's RL takes its learning rates as given: no batch-size scaling
        0.0,  # and no Muon weight decay
        compute_dtype=policy.compute_dtype,
        compile=policy.compile,
    )
    sampler = Sampler(
        built.model, tok, slots=s.device_batch_size, max_len=prep.plan.max_len, tools=s.tools,
        context=(lambda: fp8_disabled(built.model)) if built.fp8_linears else contextlib.nullcontext,
    )  # fmt: skip
    cuda = ctx.device.type == "cuda"
    rollouts = StepRollouts(
        prep.task,
        prep.problems,
        prep.prompts,
        sampler,
        s,
        seed=cfg.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        rows=prep.plan.micro_batch_rows,
        device=ctx.device,
        gather=ctx.all_gather_object,
        pad_to=128 if cuda else 1,  # fewer distinct shapes for compiled kernels
        synchronize=(lambda: torch.cuda.synchronize(ctx.device)) if cuda else (lambda: None),
    )

    def loss_fn(model: Any, slot: Slot) -> torch.Tensor:
        return policy_gradient_loss(model, rollouts.micro_batch(slot.step, slot.index))

    trainer = Trainer(
        model=built.model,
        train_model=built.train_model,
        optimizer=optimizer,
        batches=RolloutBatches(prep.plan.micro_batches),
        total_steps=prep.plan.num_iterations,
        grad_accum=prep.plan.micro_batches,
        tokens_per_step=0,  # set each step from its rollouts (below)
        ctx=ctx,
        schedule=TrainingSchedule(cfg.schedule, cfg.optim, None, lr_scale=cfg.init_lr_frac),
        loss_fn=loss_fn,
        scaler=LossScaler(enabled=policy.compute_dtype == torch.float16),
    )
    # an RL step trains on as many tokens as its rollouts hold: the Trainer counts them (state.tokens,
    # the log's tok/s) once the step's rollouts are sampled
    rollouts.on_collect = lambda stats: setattr(trainer, "tokens_per_step", stats.row_tokens)
    return trainer, built, rollouts


def rl(cfg: RLConfig, run: Run) -> dict:
    prep = prepare(cfg, run)
    base, tok = prep.base, prep.base.tokenizer
    trainer, built, rollouts = build_trainer(cfg, run, prep)
    found = resume_source(cfg.resume, run.path)
    if found is not None:
        restore(trainer, found, model_cfg=base.model, tokenizer=tok)
    else:
        load_weights(built.model, base.step_dir, model_cfg=base.model, tokenizer=tok, map_location=run.ctx.device)
    chain = base.lineage()
    record = {"source": chain[-1], "task": prep.task.name, "kind": cfg.rl_task.kind}
    run.update_record(lineage=chain, rl=record)
    meta = {
        "stage": cfg.stage,  # chat picks the chat template by it
        "config_hash": config_hash(run.resolved),
        "model_config": asdict(base.model),
        "vocab_size": tok.vocab_size,
        "plan": asdict(prep.plan),
        "tokenizer": tokenizer_record(tok),
        "init_from": str(base.step_dir),
        "lineage": chain,  # tokenizer -> base -> sft -> ... -> the checkpoint trained
        "rl": record,
    }
    trainer.hooks = rl_hooks(cfg, run, prep, built, rollouts, meta, trainer.state.step if found else None)
    return trainer.fit()


def rl_hooks(
    cfg: RLConfig, run: Run, prep: Prepared, built: Any, rollouts: StepRollouts, meta: dict, resumed_at: Any
) -> list:
    """The shared loop hooks (checkpoints, logging, stop signals...) plus the rollout log and pass@k."""
    d = shlex.quote(str(run.path))
    hooks = loop_hooks(
        cfg,
        run,
        prep.base.tokenizer,
        built,
        val_bpb=None,
        meta=meta,
        flops_per_token=built.model.flops_per_token(),
        total_steps=prep.plan.num_iterations,
        resumed_at=resumed_at,
        samples=_samples(run, rollouts),
        next_steps=[f"python -m chatlm.chat ckpt={d}", f"python -m chatlm.eval ckpt={d} eval=chat"],
        headline=("reward", "pass@1", f"pass@{cfg.rl.pass_k}"),
    )
    metrics = next(h for h in hooks if isinstance(h, LogHook)).metrics
    ours: list[Hook] = [RolloutLog(rollouts, metrics, cfg.log_every)]
    if prep.task.eval_split():
        ours.append(_pass_at_k_hook(cfg, run, prep.task, rollouts.sampler, metrics))
    else:
        log.warning("task %s: no eval problems (rl.eval_examples=%d): no pass@k", prep.task.name, cfg.rl.eval_examples)
    hooks[1:1] = ours  # after the GC hook, before samples and checkpoints
    return hooks


def _pass_at_k_hook(cfg: RLConfig, run: Run, task: ProblemTask, sampler: Sampler, metrics: Any) -> Hook:
    s, ctx = cfg.rl, run.ctx
    params = SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k)

    def evaluate() -> dict:
        problems = task.eval_split()
        return evaluate_pass_at_k(
            sampler,
            task,
            problems,
            s.pass_k,
            params,
            seed=cfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            gather=ctx.all_gather_object,
        )

    hook = EvalHook(cfg.eval_every, evaluate, metrics, ("pass@1", f"pass@{s.pass_k}"))
    hook.at_start = True  # also the model RL starts from, as nanochat
    return hook
