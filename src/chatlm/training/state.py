"""`TrainState`: the counters of a training run, and what a checkpoint restores beyond the weights.

The model and optimizer states are the modules' own; the per-rank loader and RNG states are
gathered at save time. This object holds the rest: the step, the tokens seen, the smoothed loss,
the training time (without the first 10 steps, nanochat's leaderboard time) and what the hooks keep
(the best validation bpb). In meta.json it is the `step`, `tokens` and `loop` entries, as chatlm
has always written them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

SMOOTHING = 0.9  # EMA of the training loss, bias-corrected (nanochat's log line)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all ranks together
    smooth_loss: float = 0.0  # the EMA before bias correction
    train_time: float = 0.0  # seconds of training steps after the first 10
    last_loss: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)  # hook state, e.g. min_val_bpb
    loader_state: Optional[dict] = None  # this rank's loader position, set by a resume
    resumed_from: Optional[str] = None  # the checkpoint this run continues, if any

    def record_loss(self, loss: float) -> float:
        """Update the EMA with this step's loss (after `step` was advanced); returns the smoothed value."""
        self.last_loss = loss
        self.smooth_loss = SMOOTHING * self.smooth_loss + (1 - SMOOTHING) * loss
        return self.smooth_loss / (1 - SMOOTHING**self.step)

    def loop_meta(self) -> dict:
        """meta.json's `loop` entry."""
        return {
            **self.extra,
            "smooth_loss": self.smooth_loss,
            "train_time": self.train_time,
            "last_loss": self.last_loss,
        }

    @classmethod
    def from_meta(cls, meta: dict, tokens_per_step: int = 0) -> TrainState:
        """The state a checkpoint's meta.json describes (checkpoints before `tokens` was recorded:
        step x tokens_per_step)."""
        loop = dict(meta.get("loop") or {})
        step = int(meta["step"])
        state = cls(
            step=step,
            tokens=int(meta.get("tokens", step * tokens_per_step)),
            smooth_loss=float(loop.pop("smooth_loss", 0.0)),
            train_time=float(loop.pop("train_time", 0.0)),
            last_loss=float(loop.pop("last_loss", math.nan)),
        )
        state.extra = loop
        return state
