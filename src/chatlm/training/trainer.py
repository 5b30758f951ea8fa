"""`Trainer`: the optimizer step every training stage shares, and the loop around it.

`step()` is one optimizer step as nanochat's base_train takes it (spec §3.6): `grad_accum`
micro-batches, each forward -> loss / accum -> backward -> fetch the next batch (host work overlaps
the queued device work); then the schedule's hyperparameters, one `.item()` (the only host sync),
the optimizer step (which syncs gradients across ranks), `zero_grad`, and a device synchronize for
the timing. A non-finite loss stops before the bad update.

`fit()` runs `step()` until `total_steps`, calling hooks (`chatlm.training.hooks`) before each step
(evaluation, samples, checkpoints) and after it (logging, profiling, stop signals), then returns
the final metrics. Pretraining, SFT and RL differ only in their batches, their loss and their
schedule; `python -m chatlm.bench` times `step()` itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import torch

from chatlm.errors import ChatlmError
from chatlm.optim.loss_scale import LossScaler
from chatlm.training.state import TrainState


class NonFiniteLoss(ChatlmError):
    """The training loss became NaN or infinite."""


class Hyperparameters(NamedTuple):
    """What a schedule sets before each optimizer step (MuonAdamW.set_hyperparameters)."""

    lr_multiplier: float
    muon_momentum: Optional[float] = None
    muon_weight_decay: Optional[float] = None


Schedule = Callable[[int, int], Hyperparameters]  # (step, total steps) -> hyperparameters
LossFn = Callable[[Any, Any], torch.Tensor]  # (model, batch) -> scalar loss


class Batches(Protocol):
    def next_batch(self) -> Any: ...

    def state_dict(self, include_last_batch: bool = False) -> dict: ...


def default_loss(model: Any, batch: Any) -> torch.Tensor:
    """Pretraining and SFT: batch = (inputs, targets), targets -1 where nothing is predicted."""
    inputs, targets = batch
    return model(inputs, targets)


@dataclass
class StepResult:
    step: int  # steps done after this one
    loss: float  # the last micro-batch's loss
    dt: float  # seconds of the whole step
    lr_multiplier: float
    tokens: int  # tokens seen after this step
    smooth_loss: float = math.nan  # set by fit()


class Trainer:
    """One model, one optimizer, one batch stream; see the module docstring.

    `model` is the module whose state is saved; `train_model` what runs forward (the compiled model,
    or `model`). `tokens_per_step` counts all ranks together. `ctx` is the rank's DistContext.
    """

    def __init__(
        self,
        *,
        model: Any,
        optimizer: Any,
        batches: Batches,
        total_steps: int,
        grad_accum: int,
        tokens_per_step: int,
        schedule: Schedule,
        ctx: Any,
        train_model: Any = None,
        loss_fn: LossFn = default_loss,
        scaler: Optional[LossScaler] = None,
        hooks: Sequence[Any] = (),
        state: Optional[TrainState] = None,
    ):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.train_model = train_model if train_model is not None else model
        self.total_steps, self.grad_accum, self.tokens_per_step = total_steps, grad_accum, tokens_per_step
        self.schedule, self.loss_fn, self.ctx = schedule, loss_fn, ctx
        self.scaler = scaler or LossScaler(enabled=False)
        self.hooks = list(hooks)
        self.state = state or TrainState()
        self.start_step = self.state.step
        self.params = list(model.parameters())
        self.device = ctx.device
        self._batch: Any = None

    # -- one step ----------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One optimizer step (see the module docstring); advances `state.step` and `state.tokens`."""
        t0 = time.perf_counter()
        if self._batch is None:
            self._batch = self.batches.next_batch()
        batch = self._batch
        for _ in range(self.grad_accum):
            loss = self.loss_fn(self.train_model, batch)
            self.scaler.scale_loss(loss / self.grad_accum).backward()
            batch = self.batches.next_batch()  # host work overlaps the queued device work
        self._batch = batch
        hp = self.schedule(self.state.step, self.total_steps)
        self.optimizer.set_hyperparameters(*hp)
        finite_grads = self.scaler.unscale_and_check(self.params)
        value = loss.detach().item()  # the one host sync of the step
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss is {value} at step {self.state.step}")
        if finite_grads:
            self.optimizer.step()
        self.scaler.update(finite_grads)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        return StepResult(self.state.step, value, time.perf_counter() - t0, hp.lr_multiplier, self.state.tokens)

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Steps until `total_steps` with the hooks around them; returns the final metrics."""
        self.start_step = self.state.step
        failed = True
        try:
            if self._batch is None:
                self._batch = self.batches.next_batch()
            for hook in self.hooks:
                hook.on_start(self)
            while True:
                last = self.state.step == self.total_steps
                for hook in self.hooks:
                    hook.before_step(self, last)
                if last:
                    break
                result = self._step_with_notes()
                self._account(result)
                for hook in self.hooks:
                    hook.after_step(self, result)
            final = self.final_metrics()
            for hook in self.hooks:
                hook.on_end(self, final)
            failed = False
            return final
        finally:
            for hook in reversed(self.hooks):
                hook.close(self, failed)

    def _step_with_notes(self) -> StepResult:
        """`step()`; a non-finite loss gets the hooks' notes (where the last good weights are)."""
        try:
            return self.step()
        except NonFiniteLoss as e:
            notes = [note for hook in self.hooks if (note := hook.on_failure(self, e))]
            raise NonFiniteLoss("; ".join([str(e), *notes])) from None

    def _account(self, result: StepResult) -> None:
        """Training time (without the first 10 steps, as nanochat's leaderboard) and the smoothed loss."""
        if result.step > self.start_step + 10 or self.total_steps - self.start_step <= 10:
            self.state.train_time += result.dt
        result.smooth_loss = self.state.record_loss(result.loss)

    def final_metrics(self) -> dict:
        final: dict[str, Any] = {"steps": self.total_steps, "tokens": self.state.tokens}
        for hook in self.hooks:
            final.update(hook.final_metrics(self))
        final.update(train_loss=self.state.last_loss, train_time_s=round(self.state.train_time, 3))
        if self.device.type == "cuda":
            final["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return final
