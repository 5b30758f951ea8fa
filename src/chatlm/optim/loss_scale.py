"""Dynamic loss scaling for fp16 compute (bf16 and fp32 need none).

fp16 gradients underflow without it. The loss is multiplied by `scale` before backward; before the
optimizer step the gradients are divided back and checked. A non-finite gradient on any rank
skips the step on every rank (the flag is all-reduced with MAX, since nanochat-style optimizers
average gradients inside `step()` and ranks must agree), and halves the scale. After
`growth_interval` good steps in a row the scale doubles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, enabled: bool = True):
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.enabled = enabled
        self._good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, params: list[torch.Tensor]) -> bool:
        """Divide every gradient by the scale; True if all are finite on every rank."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        device = grads[0].device
        found_inf = torch.zeros(1, device=device)
        inv = torch.full((1,), 1.0 / self.scale, device=device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        return found_inf.item() == 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if finite:
            self._good_steps += 1
            if self._good_steps >= self.growth_interval:
                self.scale *= 2.0
                self._good_steps = 0
        else:
            self.scale /= 2.0
            self._good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
