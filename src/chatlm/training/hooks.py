"""Work around the optimizer steps, as objects with a cadence (no closures over loop state).

A hook may implement any of:
- `on_start(trainer)`: once, before the first step (after the first batch is fetched);
- `before_step(trainer, last)`: with `trainer.state.step` steps done; `last` when none remain;
- `after_step(trainer, result)`: after each step (`result` is a StepResult);
- `on_failure(trainer, error) -> str | None`: a non-finite loss; the returned note joins the message;
- `final_metrics(trainer) -> dict`: what it adds to the run's final metrics;
- `on_end(trainer, final)` and `close(trainer, failed)` (always, in reverse order).

The pretraining hooks, in the order the trainer calls them: GC, validation, samples, checkpoint,
logging, profiler, stop. A new stage adds its own (chat evals for SFT, pass@k for RL) beside these.
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any, Callable, Optional

import torch

from chatlm.errors import Interrupted, Preempted
from chatlm.runtime.signals import StopSignal

log = logging.getLogger("chatlm")


def due(step: int, every: int, last: bool, at_start: bool = False) -> bool:
    """Periodic work: at multiples of `every` (> 0), at the end, and at step 0 only if `at_start`."""
    return last or (every > 0 and (step > 0 or at_start) and step % every == 0)


class Hook:
    """The no-op base: subclasses override what they need."""

    def on_start(self, trainer: Any) -> None: ...

    def before_step(self, trainer: Any, last: bool) -> None: ...

    def after_step(self, trainer: Any, result: Any) -> None: ...

    def on_failure(self, trainer: Any, error: BaseException) -> Optional[str]:
        return None

    def final_metrics(self, trainer: Any) -> dict:
        return {}

    def on_end(self, trainer: Any, final: dict) -> None: ...

    def close(self, trainer: Any, failed: bool) -> None: ...


class GCHook(Hook):
    """nanochat §3.9: collect, freeze and disable the GC after the first step (scans cost ~500 ms),
    then collect by hand every `every` steps; enabled again at the end."""

    def __init__(self, every: int = 5000):
        self.every = every

    def after_step(self, trainer: Any, result: Any) -> None:
        if result.step == trainer.start_step + 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif result.step % self.every == 0:
            gc.collect()

    def close(self, trainer: Any, failed: bool) -> None:
        gc.enable()


class Periodic(Hook):
    """`fn(step)` every `every` steps and at the end (and at step 0 with `at_start`)."""

    def __init__(self, every: int, fn: Callable[[int], Any], at_start: bool = False):
        self.every, self.fn, self.at_start = every, fn, at_start

    def before_step(self, trainer: Any, last: bool) -> None:
        if due(trainer.state.step, self.every, last, self.at_start):
            self.fn(trainer.state.step)


class ValidationHook(Periodic):
    """Validation bits-per-byte at a cadence (also of the fresh model, as nanochat), its minimum in
    the train state, both logged. `evaluate()` returns the bpb (a collective: every rank calls it)."""

    def __init__(self, every: int, evaluate: Callable[[], float], metrics: Any):
        super().__init__(every, self._validate, at_start=True)
        self.evaluate, self.metrics = evaluate, metrics
        self.trainer: Any = None
        self.last_bpb = math.nan

    def on_start(self, trainer: Any) -> None:
        self.trainer = trainer
        trainer.state.extra.setdefault("min_val_bpb", math.inf)

    def _validate(self, step: int) -> None:
        bpb = self.evaluate()
        state = self.trainer.state
        state.extra["min_val_bpb"] = min(state.extra["min_val_bpb"], bpb)
        self.last_bpb = bpb
        self.metrics.log(step, {"val_bpb": bpb}, section="val", context={"tokens": state.tokens})
        log.info("step %d | val bpb %.4f", step, bpb)

    def final_metrics(self, trainer: Any) -> dict:
        return {"val_bpb": self.last_bpb, "min_val_bpb": trainer.state.extra.get("min_val_bpb", math.inf)}


class EvalHook(Periodic):
    """An evaluation every `every` steps and at the end (nanochat: not at step 0), through the
    evaluation stage's code: CORE (`core`, or `core_partial` over fewer than its 22 tasks, and each
    task's centred accuracy) or chat tasks (their accuracies). The scores are logged; those named
    in `final_keys` go into the run's final metrics."""

    def __init__(self, every: int, evaluate: Callable[[], dict], metrics: Any, final_keys: tuple[str, ...]):
        super().__init__(every, self._evaluate)
        self.evaluate, self.metrics, self.final_keys = evaluate, metrics, final_keys
        self.trainer: Any = None
        self.last: dict = {}

    def on_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def _evaluate(self, step: int) -> None:
        self.last = self.evaluate()
        self.metrics.log(step, self.last, section="eval", context={"tokens": self.trainer.state.tokens})
        shown = " | ".join(f"{k} {v:.4f}" for k, v in self.last.items() if k in self.final_keys)
        log.info("step %d | %s", step, shown)

    def final_metrics(self, trainer: Any) -> dict:
        return {k: v for k, v in self.last.items() if k in self.final_keys}


class LogHook(Hook):
    """A metrics.jsonl row (and the sinks) every `every` steps and at the last one; the progress
    bar every step. MFU needs the model's FLOPs per token and the device's peak."""

    def __init__(
        self,
        metrics: Any,
        every: int,
        flops_per_token: float,
        peak_flops: Optional[float],
        world_size: int,
        fp16: bool = False,
    ):
        self.metrics, self.every, self.fp16 = metrics, every, fp16
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak_flops, world_size

    def after_step(self, trainer: Any, result: Any) -> None:
        from chatlm.runtime.flops import mfu

        tok_s = trainer.tokens_per_step / result.dt
        util = mfu(self.flops_per_token, tok_s, self.peak, self.world_size)
        if result.step % self.every == 0 or result.step == trainer.total_steps:
            row = {
                "tokens": result.tokens,
                "loss": result.loss,
                "smooth_loss": result.smooth_loss,
                "lrm": result.lr_multiplier,
                "dt_ms": 1000 * result.dt,
                "tok_per_s": tok_s,
                "mfu": util,
                "train_time_s": trainer.state.train_time,
            }
            if trainer.device.type == "cuda":
                row["mem_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
            if self.fp16:
                row["loss_scale"] = trainer.scaler.scale
            self.metrics.log(result.step, row)
        self.metrics.progress(
            result.step,
            loss=result.smooth_loss,
            lrm=result.lr_multiplier,
            dt_ms=1000 * result.dt,
            tok_per_s=tok_s,
            mfu=util,
        )

    def on_end(self, trainer: Any, final: dict) -> None:
        self.metrics.summary(final)

    def close(self, trainer: Any, failed: bool) -> None:
        self.metrics.close(failed=failed)


class ProfilerHook(Hook):
    """torch.profiler over a window of steps (`debug=profile`); see chatlm.runtime.profile."""

    def __init__(self, profiler: Any):
        self.profiler = profiler

    def after_step(self, trainer: Any, result: Any) -> None:
        self.profiler.step(result.step)

    def close(self, trainer: Any, failed: bool) -> None:
        self.profiler.finish()  # (a run shorter than the profiled window still writes what it saw)


class StopHook(Hook):
    """Stop signals (chatlm.runtime.signals) and `stop_at_step`: at the end of a step, checkpoint
    and raise `Preempted` (scheduler signals, the drill) or `Interrupted` (Ctrl-C)."""

    def __init__(self, checkpoint: Any, stop_at_step: int, resume_hint: str):
        self.checkpoint, self.stop_at_step, self.resume_hint = checkpoint, stop_at_step, resume_hint
        self.signal = StopSignal()

    def on_start(self, trainer: Any) -> None:
        self.signal.__enter__()

    def after_step(self, trainer: Any, result: Any) -> None:
        if not (self.signal.agreed(trainer.ctx) or result.step == self.stop_at_step):
            return
        self.checkpoint.save(trainer, result.step)
        if self.signal.signum is None:
            raise Preempted(f"at stop_at_step={self.stop_at_step} with a checkpoint; {self.resume_hint}")
        if self.signal.interrupted:
            raise Interrupted(f"Ctrl-C: stopped after step {result.step} with a checkpoint; {self.resume_hint}")
        requeue = self.signal.requeue_handler
        then = "requeueing the job" if requeue else self.resume_hint
        raise Preempted(
            f"{self.signal.describe()}: stopped after step {result.step} with a checkpoint; {then}",
            signum=self.signal.signum,
            requeue=requeue,
        )

    def close(self, trainer: Any, failed: bool) -> None:
        self.signal.__exit__()
