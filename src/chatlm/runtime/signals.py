"""Signals, in one place: what SIGTERM, SIGINT (Ctrl-C) and Slurm's SIGUSR1/SIGUSR2 do to a run.

- Outside a training loop (`terminate_on_sigterm`, installed around every stage body by
  `chatlm.runtime.rundir.run_rank`): SIGTERM raises `Terminated` in the main thread, so `finally`
  blocks run and the record is closed as failed with exit code 143.
- Inside a training loop (`StopSignal`, entered by the Trainer): SIGTERM, SIGUSR1, SIGUSR2 and SIGINT
  only set a flag. At the end of the current step the ranks agree on it (one all_reduce), the loop
  writes a checkpoint and stops: `preempted` for the Slurm signals, `interrupted` for Ctrl-C. A
  second Ctrl-C stops at once (KeyboardInterrupt). SIGUSR2 is what submitit sends before a Slurm
  time limit: the handler it had installed is handed on as `requeue`, so the job is requeued only
  after the checkpoint exists.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as tdist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Terminated(SystemExit):
    """SIGTERM arrived outside a training loop; raised in the main thread."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM raises `Terminated` (exit code 143) while the block runs (main thread only)."""
    if not in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignal:
    """Turns the stop signals into a flag checked once per step; see the module docstring."""

    SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if in_main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        if self.signum is None or signum == signal.SIGUSR2:  # USR2 (requeue) wins over the SIGTERM after it
            self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def interrupted(self) -> bool:
        """Ctrl-C, not a scheduler's signal."""
        return self.signum == signal.SIGINT

    @property
    def requeue_handler(self) -> Optional[Callable]:
        """The handler that owned SIGUSR2 before us (submitit's requeue), if that is what arrived."""
        handler = self._previous.get(signal.SIGUSR2)
        return handler if self.signum == signal.SIGUSR2 and callable(handler) else None

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def agreed(self, ctx: Any) -> bool:
        """Whether any rank saw a stop signal (a collective: every rank calls it each step)."""
        flag = self.signum is not None
        if ctx is not None and ctx.distributed:
            t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag
