"""Hydra callbacks (registered in conf/hydra/default.yaml).

`SweepSummary` writes summary.csv / summary.md at the root of every multirun sweep, including
failed jobs. Hydra turns exceptions raised in callbacks into warnings, so a sweep with failed jobs
is reported through `take_failure()`, which `chatlm.hydra.app.run_stage` checks to exit non-zero. Hydra
skips `on_multirun_end` when a launcher raises (e.g. a Slurm job killed outright), so the summary is
also written by an exit hook armed at `on_multirun_start`.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from chatlm.runs.summary import write_summary

log = logging.getLogger("chatlm")


_failure: str | None = None


def take_failure() -> str | None:
    """The message of the last sweep that had jobs not completing (and forget it)."""
    global _failure
    message, _failure = _failure, None
    return message


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._sweep_dir: Path | None = None
        self._written = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        self._written = False
        atexit.register(self._write_if_pending)

    def _write(self) -> list[dict]:
        assert self._sweep_dir is not None
        self._written = True
        if not self._sweep_dir.is_dir():
            return []
        rows = write_summary(self._sweep_dir)
        log.info("sweep summary: %s", self._sweep_dir / "summary.md")
        return rows

    def _write_if_pending(self) -> None:
        # (a launch refused before submitting leaves no sweep directory, and gets no summary)
        if self._sweep_dir is not None and not self._written and self._sweep_dir.is_dir():
            try:
                self._write()
            except Exception as e:  # exit hooks must not raise
                log.warning("could not write the sweep summary: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _failure
        from chatlm.hydra.launcher import take_submitted

        submitted = take_submitted()
        if submitted is not None:  # hydra.launcher.wait=false: the jobs run on without us
            self._written = True
            log.info(
                "submitted %d job(s) (%s) and not waiting. Follow them with `squeue --me` and "
                "`chatlm runs ls %s`; when they are done, `chatlm runs summarize %s` writes the summary",
                len(submitted["jobs"]),
                ", ".join(submitted["jobs"]),
                submitted["sweep_dir"],
                submitted["sweep_dir"],
            )
            return
        rows = self._write()
        bad = [r for r in rows if r["status"] != "completed"]
        if bad:
            jobs = ", ".join(f"#{r['job']} {r['status']} ({r['overrides']})" for r in bad)
            _failure = (
                f"{len(bad)} of {len(rows)} sweep jobs did not complete: {jobs}. See {self._sweep_dir / 'summary.md'}"
            )
