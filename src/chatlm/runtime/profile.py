"""`debug=profile`: a torch.profiler trace of a few training steps, written into the run directory.

profile/trace_rank<r>.json   Chrome/Perfetto trace (open in https://ui.perfetto.dev)
profile/summary_rank<r>.txt  the top operators by self time (CPU and, on GPU, CUDA)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("chatlm")


class StepProfiler:
    """Profiles steps [start, start + steps) of the loop; `step(n)` is called after step n ends."""

    def __init__(self, run_dir: Path, rank: int, start: int, steps: int, device: torch.device) -> None:
        self.dir = Path(run_dir) / "profile"
        self.rank, self.start, self.steps, self.device = rank, start, steps, device
        self._prof: Optional[Any] = None
        self.done = steps <= 0

    def step(self, step: int) -> None:
        if self.done:
            return
        if self._prof is None and step >= self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self._prof.__enter__()
            log.info("profiling steps %d..%d", step + 1, step + self.steps)
        elif self._prof is not None and step >= self.start + self.steps:
            self.finish()

    def finish(self) -> None:
        if self._prof is None or self.done:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        self._prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=sort, row_limit=30)
        (self.dir / f"summary_rank{self.rank}.txt").write_text(table + "\n")
        log.info("profile of %d steps: %s", self.steps, trace)
        self.done = True
        self._prof = None
