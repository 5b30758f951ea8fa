"""The hooks every training stage hands its `Trainer` (pretraining and SFT): validation, the
stage's evaluations and the chat evals, samples, checkpoints, logging, profiling, stop signals
and the closing summary, in the order the trainer calls them (chatlm.training.hooks)."""

from __future__ import annotations

import logging
import math
import shlex
import time
from typing import Any, Callable, Optional, Sequence

import torch

from chatlm.model.fp8 import fp8_disabled
from chatlm.runtime.flops import peak_flops
from chatlm.runtime.metric_logger import MetricLogger
from chatlm.runtime.profile import StepProfiler
from chatlm.runtime.rundir import Run, resume_hint
from chatlm.runtime.sinks import format_duration
from chatlm.training.checkpointing import CheckpointHook
from chatlm.training.hooks import EvalHook, GCHook, Hook, LogHook, Periodic, ProfilerHook, StopHook, ValidationHook

log = logging.getLogger("chatlm")

#: (every N steps, evaluate() -> scores, the score keys that go into the final metrics)
EvalSpec = tuple[int, Callable[[], dict], tuple[str, ...]]


def chat_evals(cfg: Any, run: Run, tok: Any, built: Any) -> Callable[[], dict]:
    """The chat evals (`cfg.chat_eval`) of the current weights (uncompiled, fp8 off), through the
    eval stage's code; their data read and checked here, before the first step."""
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

    def __init__(self, run: Run, next_steps: Sequence[str], headline: Sequence[str] = ()):
        self.run, self.next_steps, self.headline = run, list(next_steps), list(headline)
        self.t0 = time.time()

    def on_end(self, trainer: Any, final: dict) -> None:
        if not self.run.is_main:
            return
        d = shlex.quote(str(self.run.path))
        steps = [f"chatlm runs show {d}", f"chatlm runs plot {d} --metric val_bpb --out val_bpb.png", *self.next_steps]
        scores = [f"train loss {final['train_loss']:.4f}"]
        if isinstance(final.get("val_bpb"), float) and math.isfinite(final["val_bpb"]):
            scores.append(f"val bpb {final['val_bpb']:.4f} (best {final.get('min_val_bpb', math.nan):.4f})")
        scores += [f"{k} {final[k]:.4f}" for k in self.headline if isinstance(final.get(k), (int, float))]
        log.info(
            "done: %d steps, %s tokens in %s | %s\n  run directory: %s\nnext:\n  %s",
            final["steps"],
            f"{final['tokens']:,}",
            format_duration(time.time() - self.t0),
            " | ".join(scores),
            self.run.path,
            "\n  ".join(steps),
        )


class SampleWriter:
    """nanochat's samples: 7 fixed prompts, greedy, 16 tokens, into samples/step_<N>.txt (main rank)."""

    def __init__(self, run: Run, tok: Any, model: Any):
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


def loop_hooks(
    cfg: Any,
    run: Run,
    tok: Any,
    built: Any,
    *,
    val_bpb: Optional[Callable[[], float]],
    meta: dict,
    flops_per_token: float,
    total_steps: int,
    resumed_at: Optional[int],
    evals: Sequence[EvalSpec] = (),
    samples: Optional[Callable[[int], None]] = None,
    next_steps: Sequence[str] = (),
    headline: Sequence[str] = (),
) -> list:
    """The hooks of a training run. `cfg` has the loop keys (chatlm.config.stages.LoopConfig);
    `meta` is what every checkpoint's meta.json records; `val_bpb` None skips validation;
    `samples` replaces nanochat's fixed-prompt samples (SampleWriter); `headline`: final metrics the
    closing summary prints beside the loss (the stage's own, e.g. RL's reward)."""
    ctx = run.ctx
    metrics = MetricLogger(run, cfg.logger, total_steps=total_steps, resume_step=resumed_at)
    checkpoint = CheckpointHook(
        run, every=cfg.save_every, meta=meta, tokenizer=tok, keep=cfg.keep_checkpoints, fresh_run=resumed_at is None
    )
    device = ctx.device
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "", cfg.hardware.peak_flops)
    profiler = StepProfiler(run.path, ctx.rank, (resumed_at or 0) + cfg.profile_start, cfg.profile_steps, device)
    specs = list(evals)
    if cfg.chat_metric_every > 0:
        specs.append((cfg.chat_metric_every, chat_evals(cfg, run, tok, built), tuple(cfg.chat_eval.tasks)))
    return [
        GCHook(),
        *([ValidationHook(cfg.eval_every, val_bpb, metrics)] if val_bpb is not None else []),
        *(EvalHook(every, evaluate, metrics, keys) for every, evaluate, keys in specs),
        Periodic(cfg.sample_every, samples or SampleWriter(run, tok, built.model)),
        checkpoint,
        LogHook(
            metrics,
            cfg.log_every,
            flops_per_token,
            peak,
            ctx.world_size,
            fp16=run.policy.compute_dtype == torch.float16,
        ),
        ProfilerHook(profiler),
        StopHook(checkpoint, cfg.stop_at_step, resume_hint(run)),
        RunSummary(run, next_steps, headline=[*headline, *(k for spec in specs for k in spec[2])]),
    ]
