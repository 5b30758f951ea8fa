"""`MetricLogger`: one call per logged row, fanned out to every place metrics go.

- `metrics.jsonl` in the run directory (rank 0; always, the source of truth),
- the optional sinks of `logger=` (W&B, TensorBoard; `chatlm.runtime.sinks`),
- the console progress (a rich bar on a terminal, plain lines otherwise).

`log(step, {"loss": ...})` writes the keys as given to metrics.jsonl and as `<section>/<key>` to the
sinks (`train/loss`); a key that already carries the section (`val_bpb` in section `val`) becomes
`val/bpb`. On ranks other than 0 every call is a no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from chatlm.runtime.sinks import ProgressReporter, Sinks, open_sinks


def sink_key(section: str, key: str) -> str:
    return f"{section}/{key.removeprefix(section + '_')}"


class MetricLogger:
    """Metrics of one run (see the module docstring)."""

    def __init__(
        self,
        run: Any,
        logger_cfg: Any,
        *,
        total_steps: int = 0,
        description: str = "train",
        resume_step: Optional[int] = None,
        sinks: Optional[Sinks] = None,
        progress: Optional[ProgressReporter] = None,
    ):
        self.run = run
        self.is_main = run.is_main
        if sinks is None:
            sweep = (run.record().get("sweep") or {}) if self.is_main else {}
            group = Path(sweep["dir"]).name if sweep.get("dir") else None  # one W&B group per sweep
            sinks = open_sinks(
                logger_cfg,
                run.path,
                run.resolved,
                _run_name(run),
                group=group,
                is_main=self.is_main,
                resume_step=resume_step,
            )
        self.sinks = sinks
        self.bar = progress or ProgressReporter(total_steps, is_main=self.is_main, description=description)

    def log(
        self, step: int, values: Mapping[str, Any], section: str = "train", context: Optional[Mapping[str, Any]] = None
    ) -> None:
        """One row: metrics.jsonl gets {"step": step, **context, **values}; the sinks get each value
        as `<section>/<key>` (`context`, e.g. the tokens seen, goes to metrics.jsonl only)."""
        if not self.is_main:
            return
        self.run.log_metrics(step=step, **(context or {}), **values)
        self.sinks.log({sink_key(section, k): v for k, v in values.items()}, step=step)

    def progress(self, step: int, **fields: Any) -> None:
        """The console line or bar after `step` of the total (loss, lrm, dt_ms, tok_per_s, mfu, ...)."""
        self.bar.update(step, **fields)

    def summary(self, final: Mapping[str, Any]) -> None:
        self.sinks.summary(final)

    def close(self, failed: bool = False) -> None:
        self.bar.close()
        self.sinks.close(exit_code=1 if failed else 0)


def _run_name(run: Any) -> str:
    return str((run.resolved or {}).get("run_name") or run.path.name)
