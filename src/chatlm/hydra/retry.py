"""`chatlm runs retry SWEEP_DIR`: run a sweep's failed or missing points again, in place.

Which points: a point is done when its run.json says `completed`; `failed`, `preempted` and `interrupted` points
and points that never got a run directory are retried; `running` ones are left alone (they may
still be running; if they died, `chatlm runs show` says so and `--include-running` takes them).

How:
- sweeps made by chatlm's submitit launchers (`cluster=slurm_*`, `cluster=submitit_local`) keep a
  `sweep.json`; the same command is submitted again (`-m`, the same overrides, the same launcher)
  into the same sweep directory with `hydra.launcher.only_jobs=[...]`, so every point keeps its
  job number and directory;
- sweeps run in-process (`-m` with the default launcher) are retried point by point as single
  runs into their original directories.

Without `--resume` a retried point starts from scratch: its old directory is moved to
`<sweep>/.retried/` (nothing is deleted). With `--resume` a directory holding a checkpoint is kept
and the run continues from it (resume=auto); the others start from scratch.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from chatlm.errors import ChatlmError
from chatlm.runs.summary import job_dirs_by_num, read_sweep_record
from chatlm.runtime.rundir import read_json

RETRY_STATUSES = ("failed", "preempted", "interrupted", "missing")


class RetryError(ChatlmError):
    """The directory is not a sweep that can be retried."""


@dataclass
class Point:
    num: int
    overrides: list[str]
    run_dir: Path
    status: str  # completed | failed | preempted | interrupted | running | missing
    has_checkpoint: bool = False


@dataclass
class RetryPlan:
    sweep_dir: Path
    stage: str
    cwd: str
    chatlm_launcher: bool
    task_overrides: list[str]
    hydra_overrides: list[str]
    points: list[Point]
    chosen: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def commands(self) -> list[list[str]]:
        """The command line(s) that re-run the chosen points."""
        if not self.chosen:
            return []
        base = [sys.executable, "-m", f"chatlm.{self.stage}"]
        if self.chatlm_launcher:
            hydra = [
                o
                for o in self.hydra_overrides
                if not o.startswith(("hydra.sweep.dir=", "hydra.launcher.only_jobs=", "hydra.mode="))
            ]
            nums = ",".join(str(p.num) for p in self.chosen)
            return [
                base
                + [
                    "-m",
                    *self.task_overrides,
                    *hydra,
                    f"hydra.sweep.dir={quoted(self.sweep_dir)}",
                    f"hydra.launcher.only_jobs=[{nums}]",
                ]
            ]
        hydra = [o for o in self.hydra_overrides if not o.startswith(("hydra.sweep.", "hydra.run.dir=", "hydra.mode="))]
        return [base + [*p.overrides, *hydra, f"hydra.run.dir={quoted(p.run_dir)}"] for p in self.chosen]


def quoted(path: Path) -> str:
    """A path as a Hydra override value (job directories contain '=' and ',')."""
    text = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


# ----------------------------------------------------------------------------------------------
# reading a sweep


def _status(run_dir: Path) -> str:
    record = read_json(run_dir / "run.json") if run_dir.is_dir() else None
    return str(record.get("status", "missing")) if record else "missing"


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else False


def _multirun_config(sweep_dir: Path) -> dict:
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise RetryError(f"{sweep_dir} is not a sweep directory (no multirun.yaml or sweep.json)")
    return yaml.safe_load(path.read_text()) or {}


def _expand_points(task_overrides: list[str]) -> list[list[str]]:
    """The sweep's points in Hydra's order (job numbers), as its basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return [list(p) for batch in BasicSweeper.split_arguments(parsed, None) for p in batch]


def _dirname_for(point: list[str], hydra_cfg: dict) -> str:
    """`<overrides>` part of a job directory, as conf/hydra/default.yaml derives it."""
    from chatlm.hydra.store import safe_dirname

    od = ((hydra_cfg.get("job") or {}).get("config") or {}).get("override_dirname") or {}
    exclude = set(od.get("exclude_keys") or [])
    kv, item = od.get("kv_sep", "="), od.get("item_sep", ",")
    lines = sorted(o for o in point if o.split("=", 1)[0].lstrip("+~") not in exclude)
    return safe_dirname(item.join(lines).replace("=", kv))


def read_sweep(sweep_dir: Path) -> RetryPlan:
    sweep_dir = Path(sweep_dir).absolute()
    if not sweep_dir.is_dir():
        raise RetryError(f"no such directory: {sweep_dir}")
    record = read_sweep_record(sweep_dir)
    existing = job_dirs_by_num(sweep_dir)
    multirun = _multirun_config(sweep_dir) if record is None else {}
    if record is not None:
        target = (record.get("launcher") or {}).get("target", "")
        plan = RetryPlan(
            sweep_dir,
            record.get("stage") or "train",
            record.get("cwd") or ".",
            "chatlm_launcher" in target or "chatlm.launcher" in target or "chatlm.hydra.launcher" in target,
            list(record.get("task_overrides") or []),
            list(record.get("hydra_overrides") or []),
            [],
        )
        known = {int(j["num"]): j for j in record.get("jobs", [])}
        points = _expand_points(plan.task_overrides)
        for num, point in enumerate(points):
            info = known.get(num)
            run_dir = Path(info["run_dir"]) if info and info.get("run_dir") else existing.get(num)
            plan.points.append(Point(num, point, run_dir or sweep_dir / f"{num}_?", "missing"))
    else:
        hydra_cfg = multirun.get("hydra") or {}
        overrides = hydra_cfg.get("overrides") or {}
        plan = RetryPlan(
            sweep_dir,
            str(multirun.get("stage") or "train"),
            ".",
            False,
            list(overrides.get("task") or []),
            list(overrides.get("hydra") or []),
            [],
        )
        for num, point in enumerate(_expand_points(plan.task_overrides)):
            run_dir = existing.get(num) or sweep_dir / f"{num}_{_dirname_for(point, hydra_cfg)}"
            plan.points.append(Point(num, point, run_dir, "missing"))
    for p in plan.points:
        p.status = _status(p.run_dir)
        p.has_checkpoint = _has_checkpoint(p.run_dir)
    return plan


# ----------------------------------------------------------------------------------------------
# choosing and preparing


def plan_retry(
    sweep_dir: Path, *, failed_only: bool = False, include_running: bool = False, jobs: Optional[list[int]] = None
) -> RetryPlan:
    plan = read_sweep(sweep_dir)
    wanted = ("failed", "preempted", "interrupted") if failed_only else RETRY_STATUSES
    for p in plan.points:
        if jobs is not None:
            if p.num in jobs:
                plan.chosen.append(p)
            continue
        if p.status in wanted or (include_running and p.status == "running"):
            plan.chosen.append(p)
        elif p.status == "running":
            plan.notes.append(f"#{p.num} is still marked running: left alone (pass --include-running if it died)")
    return plan


def set_aside(plan: RetryPlan, resume: bool) -> list[str]:
    """Move the chosen points' old directories to <sweep>/.retried/ (kept with --resume when they
    hold a checkpoint). Returns one line per directory touched."""
    lines = []
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for p in plan.chosen:
        if not p.run_dir.is_dir():
            continue
        if resume and p.has_checkpoint:
            lines.append(f"#{p.num}: resuming from {p.run_dir / 'checkpoints'}")
            continue
        target = plan.sweep_dir / ".retried" / f"{p.run_dir.name}.{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p.run_dir), str(target))
        lines.append(f"#{p.num}: previous attempt moved to {target}")
    return lines


# ----------------------------------------------------------------------------------------------
# the command


def retry(
    sweep_dir: Path,
    *,
    failed_only: bool = False,
    resume: bool = False,
    include_running: bool = False,
    jobs: Optional[list[int]] = None,
    dry_run: bool = False,
    out=None,
) -> int:
    """`chatlm runs retry`: print the plan, set old attempts aside, run the command(s); the exit code."""
    import os
    import shlex
    import subprocess

    out = out or sys.stdout
    plan = plan_retry(sweep_dir, failed_only=failed_only, include_running=include_running, jobs=jobs)
    counts: dict[str, int] = {}
    for p in plan.points:
        counts[p.status] = counts.get(p.status, 0) + 1
    print(
        f"sweep {plan.sweep_dir}: {len(plan.points)} points ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ")",
        file=out,
    )
    for note in plan.notes:
        print(f"  note: {note}", file=out)
    if not plan.chosen:
        print("nothing to retry", file=out)
        return 0
    for p in plan.chosen:
        how = "resume" if resume and p.has_checkpoint else "from scratch"
        print(f"  #{p.num} {p.status:<9} {how:<12} {' '.join(p.overrides)}", file=out)
    commands = plan.commands()
    for cmd in commands:
        print("$ " + shlex.join(cmd), file=out)
    if dry_run:
        return 0
    for line in set_aside(plan, resume):
        print(f"  {line}", file=out)
    cwd = plan.cwd if os.path.isdir(plan.cwd) else os.getcwd()
    code = 0
    for cmd in commands:
        if hasattr(out, "flush"):
            out.flush()
        code = max(code, subprocess.run(cmd, cwd=cwd).returncode)
    if not plan.chatlm_launcher:  # single runs: refresh the sweep's summary ourselves
        from chatlm.runs.summary import write_summary

        write_summary(plan.sweep_dir)
    return code
