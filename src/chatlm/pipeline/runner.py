"""Run a pipeline: setup commands, then each stage as its own chatlm command whose run directory is
`<pipeline dir>/<stage>`, so a later stage points at an earlier one's directory (`{{base}}`) and
nothing is copied around.

Re-running the same command continues where the last one stopped: a stage whose run.json says
`completed` with the config hash this command would compute is skipped; an interrupted training
stage (train, sft, rl) resumes in its directory; an interrupted eval or tokenize starts over; and
once a stage has run again, every later stage runs again too (its input changed). A completed
stage whose config differs is refused with the keys that differ, never silently overwritten.

`pipeline.json` in the pipeline directory records each stage's command, status, reason and wall
time; `chatlm report <pipeline dir>` turns it into the report card.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from chatlm.errors import ChatlmError, Interrupted, Preempted, UsageError
from chatlm.pipeline.spec import RESUMABLE, Pipeline, Stage, substitute
from chatlm.runtime.rundir import read_json, write_json

#: (app, overrides) -> the config hash the stage would record, or None when it cannot be computed
HashFn = Callable[[str, list[str]], Optional[str]]


class StageFailed(ChatlmError):
    """A stage of the pipeline exited with an error."""


@dataclass
class Options:
    directory: Path
    vars: dict[str, str]
    include: set[str] = field(default_factory=set)  # optional stages to run ("all": every one)
    python: str = sys.executable
    dry_run: bool = False
    env: Optional[dict[str, str]] = None


def stage_command(stage: Stage, args: list[str], run_dir: Path, python: str) -> list[str]:
    cmd = [python, "-m", f"chatlm.{stage.app}", *args]
    if stage.has_run_dir:
        cmd.append(f"hydra.run.dir={run_dir}")
    return cmd


def _resolve_args(stage: Stage, args: list[str], values: dict[str, str], variables: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        whole = re.fullmatch(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", arg)
        words = shlex.split(variables[whole.group(1)]) if whole and whole.group(1) in variables else []
        if words and all("=" in w for w in words):  # a var of overrides standing alone: one argument each
            out += [_resolve_one(stage, a, values) for a in words]
        else:
            out.append(_resolve_one(stage, arg, values))
    return out


def _setup_args(run: list[str], variables: dict[str, str]) -> list[str]:
    """A setup command's words: a var standing alone becomes its words (none when empty)."""
    out: list[str] = []
    for arg in run:
        whole = re.fullmatch(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", arg)
        if whole and whole.group(1) in variables:
            out += shlex.split(variables[whole.group(1)])
        else:
            out.append(substitute(arg, variables, "setup"))
    return out


def _resolve_one(stage: Stage, arg: str, values: dict[str, str]) -> str:
    for _ in range(3):  # vars may name stages: {{final}} -> {{sft}} -> <dir>
        arg = substitute(arg, values, f"stage {stage.name}")
        if "{{" not in arg:
            break
    return arg


def _hydra_args(args: list[str]) -> list[str]:
    """The overrides that take part in the config (the chat app's -p TEXT is not an override)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-p", "--prompt"):
            skip = True
            continue
        if not a.startswith("hydra."):
            out.append(a)
    return out


class Runner:
    def __init__(self, pipeline: Pipeline, options: Options, config_hash: HashFn, say=print):
        self.p, self.o, self.hash, self.say = pipeline, options, config_hash, say
        self.dir = options.directory.absolute()
        self.record_path = self.dir / "pipeline.json"
        self.record: dict = {}

    # -- bookkeeping -------------------------------------------------------------------------------

    def _write(self) -> None:
        if not self.o.dry_run:
            write_json(self.record_path, self.record)

    def _entry(self, name: str) -> dict:
        return next(e for e in self.record["stages"] if e["name"] == name)

    def _selected(self, stage: Stage) -> bool:
        return not stage.optional or "all" in self.o.include or stage.name in self.o.include

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = read_json(self.record_path) or {}
        self.record = {
            "pipeline": self.p.name,
            "description": self.p.description,
            "source": self.p.source,
            "directory": str(self.dir),
            "vars": self.o.vars,
            "include": sorted(self.o.include),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "first_started": previous.get("first_started") or previous.get("started"),
            "setup": [],
            "stages": [{"name": s.name, "app": s.app, "status": "pending"} for s in self.p.stages],
        }
        self.record["first_started"] = self.record["first_started"] or self.record["started"]
        failed_setup = self._setup()
        values = dict(self.o.vars)
        rerun_rest = False
        try:
            for i, stage in enumerate(self.p.stages, 1):
                run_dir = self.dir / stage.name
                entry = self._entry(stage.name)
                if not self._selected(stage):
                    entry.update(status="not_selected", reason=f"optional: add --with {stage.name}")
                    continue
                missing = [n for n in stage.needs if n in failed_setup and n not in stage.without]
                if missing:
                    entry.update(status="skipped", reason=f"setup {', '.join(missing)} failed")
                    self.say(f"== [{i}/{len(self.p.stages)}] {stage.name}: skipped (setup {', '.join(missing)} failed)")
                    continue
                extra = [a for n in stage.needs if n in failed_setup for a in stage.without.get(n, [])]
                if extra:
                    entry["note"] = f"setup failed, so with {' '.join(extra)}"
                args = _resolve_args(stage, [*stage.args, *extra], values, self.o.vars)
                cmd = stage_command(stage, args, run_dir, self.o.python)
                entry.update(
                    command=shlex.join(["python", *cmd[1:]]), run_dir=str(run_dir) if stage.has_run_dir else None
                )
                values[stage.name] = str(run_dir)  # later stages may point at it ({{name}})
                if not rerun_rest and self._done(stage, args, run_dir, entry):
                    self.say(f"== [{i}/{len(self.p.stages)}] {stage.name}: done earlier ({entry['reason']})")
                    continue
                self.say(f"== [{i}/{len(self.p.stages)}] {stage.name}: {entry['command']}")
                rerun_rest = True
                self._execute(stage, cmd, run_dir, entry)
        finally:
            self.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._write()
        return self.record

    def _setup(self) -> set[str]:
        failed: set[str] = set()
        for item in self.p.setup:
            entry = {"name": item.name, "command": shlex.join(_setup_args(item.run, self.o.vars))}
            self.record["setup"].append(entry)
            self.say(f"== setup {item.name}: {entry['command']}")
            if self.o.dry_run:
                entry["status"] = "dry_run"
                continue
            run = _setup_args(item.run, self.o.vars)
            entry["command"] = shlex.join(run)
            cmd = [self.o.python, "-m", "chatlm.cli", *run[1:]] if run[0] == "chatlm" else run
            t0 = time.time()
            code = call_forwarding_signals(cmd, self.o.env)
            entry.update(
                status="completed" if code == 0 else "failed", exit_code=code, wall_s=round(time.time() - t0, 1)
            )
            if code == 130:
                raise Interrupted(f"interrupted during setup {item.name}")
            if code != 0:
                if not item.best_effort:
                    self._write()
                    raise StageFailed(f"setup {item.name} failed (exit code {code}): {entry['command']}")
                failed.add(item.name)
                self.say(f"   setup {item.name} failed (exit code {code}): the stages that need it will be skipped")
            self._write()
        return failed

    def _done(self, stage: Stage, args: list[str], run_dir: Path, entry: dict) -> bool:
        """Whether the stage completed earlier with this very config (see the module docstring)."""
        if not stage.has_run_dir:
            out = self.dir / f"{stage.name}.txt"
            if out.is_file() and (read_json(self.dir / f"{stage.name}.json") or {}).get("command") == entry["command"]:
                entry.update(status="completed", reason="same command, output kept", output=str(out))
                return True
            return False
        rec = read_json(run_dir / "run.json")
        if not rec or rec.get("status") != "completed":
            return False
        want = self.hash(stage.app, _hydra_args(args))
        if want is not None and want != rec.get("config_hash"):
            raise UsageError(
                f"stage {stage.name} completed earlier in {run_dir} with another config: delete that directory "
                "to run it again with this one, or choose another --dir"
            )
        entry.update(status="completed", reason="completed with the same config", wall_s=rec.get("duration_s"))
        return True

    def _execute(self, stage: Stage, cmd: list[str], run_dir: Path, entry: dict) -> None:
        if self.o.dry_run:
            entry["status"] = "dry_run"
            return
        if stage.has_run_dir and stage.app not in RESUMABLE and run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished eval or tokenize run starts over
        entry["status"] = "running"
        self._write()
        t0 = time.time()
        if stage.has_run_dir:
            code = call_forwarding_signals(cmd, self.o.env)
        else:
            code = self._capture(stage, cmd, entry)
        entry["wall_s"] = round(time.time() - t0, 1)
        if code == 0:
            entry["status"] = "completed"
            self._write()
            return
        stopped = (read_json(run_dir / "run.json") or {}).get("status") if stage.has_run_dir else None
        if code in (130, -signal.SIGINT) or stopped == "interrupted":
            entry.update(status="interrupted", exit_code=code)
        elif stopped == "preempted":
            entry.update(status="preempted", exit_code=code)
        else:
            entry.update(status="failed", exit_code=code)
        self._write()
        if entry["status"] == "interrupted":
            raise Interrupted(f"stage {stage.name} was interrupted; run the same command again to continue")
        if entry["status"] == "preempted":
            raise Preempted(f"stage {stage.name} stopped with a checkpoint; run the same command again to continue")
        where = f" (its log: {run_dir / 'logs' / 'rank0.log'})" if stage.has_run_dir else ""
        raise StageFailed(f"stage {stage.name} failed with exit code {code}{where}; fix it and run the same command")

    def _capture(self, stage: Stage, cmd: list[str], entry: dict) -> int:
        """A stage without a run directory (chat): its output shown and kept in <name>.txt."""
        proc = subprocess.run(cmd, env=self.o.env, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode == 0:
            out = self.dir / f"{stage.name}.txt"
            out.write_text(proc.stdout)
            write_json(self.dir / f"{stage.name}.json", {"command": entry["command"]})
            entry["output"] = str(out)
        return proc.returncode


FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def call_forwarding_signals(cmd: list[str], env: Optional[dict[str, str]]) -> int:
    """Run `cmd` to its end and return its exit code. SIGTERM/SIGUSR1/SIGUSR2 sent to the pipeline
    (Slurm's time-limit warning, a preemption) are passed on to the stage, which checkpoints and
    stops; Ctrl-C reaches the stage through the terminal's process group, so it is ignored here."""
    proc = subprocess.Popen(cmd, env=env)
    old = {sig: signal.signal(sig, lambda signum, _frame: proc.send_signal(signum)) for sig in FORWARDED}
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, old_int)


def default_directory(pipeline: Pipeline) -> Path:
    root = Path(os.environ.get("CHATLM_OUTPUT_ROOT", "outputs")).expanduser()
    return root / "pipelines" / pipeline.name


def summary_lines(record: dict) -> list[str]:
    lines = []
    for e in record["stages"]:
        wall = f"{e['wall_s']:.0f}s" if isinstance(e.get("wall_s"), (int, float)) else ""
        why = f" ({e['reason']})" if e.get("reason") else ""
        lines.append(f"  {e['name']:<12} {e['status']:<13} {wall:>6}{why}")
    return lines


def dump(record: dict) -> str:
    return json.dumps(record, indent=2)
