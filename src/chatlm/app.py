"""The Hydra edge: every stage app is `run_stage(<stage>, <body>)`.

compose (Hydra) -> typed config (dataclasses from chatlm.config) -> rank setup (chatlm.runtime.dist)
-> run directory (chatlm.runtime.rundir) -> `body(cfg, run)`, a plain function.

This is the only module (with `chatlm.hydra_callbacks`) that imports Hydra. It also
- finds `conf/` (inside the installed package, or at the repository root for editable installs),
- registers the schemas in Hydra's ConfigStore and the `chatlm_*` resolvers used by conf/hydra,
- makes all ranks of a `torchrun`/`srun` launch agree on one run directory before Hydra composes,
- turns bad input into one clear line (unknown keys get a "did you mean"), never a deep traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from chatlm import config as C
from chatlm.runtime import dist, stamp
from chatlm.runtime.rundir import JobInfo, Run, run_rank

StageBody = Callable[[Any, Run], Optional[dict]]


# ----------------------------------------------------------------------------------------------
# where the YAML lives


def conf_dir() -> Path:
    """The `conf/` tree: shipped as `chatlm/conf` in a wheel, at the repo root in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"chatlm's conf/ directory was not found next to {here} (wheel) or at the repository root "
        "(editable install). Reinstall with `pip install .` or `pip install -e .`."
    )


def group_options(group: str) -> list[str]:
    """The option names of a config group (`model` -> ['d12', 'd20', ...])."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups() -> list[str]:
    """Every config group under conf/ (nested ones as 'hydra/launcher')."""
    root = conf_dir()
    return sorted({str(p.parent.relative_to(root)) for p in root.rglob("*.yaml") if p.parent != root})


# ----------------------------------------------------------------------------------------------
# ConfigStore and resolvers (idempotent; done at import so submitit jobs that unpickle a task
# function from this module have them too)


def register_configs() -> None:
    cs = ConfigStore.instance()
    for stage, schema in C.STAGE_SCHEMAS.items():
        cs.store(name=f"{stage}_schema", node=schema)
    for group, schema in C.GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=group, node=schema)
    from chatlm import launcher

    launcher.register()  # hydra/launcher options chatlm_slurm, chatlm_local


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def safe_dirname(text: str, limit: int = 120) -> str:
    """A sweep job's override string as one safe path component (no '/', bounded length)."""
    import hashlib

    text = _UNSAFE.sub("_", str(text)) or "default"
    if len(text) > limit:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[: limit - 9]}~{digest}"
    return text


def register_resolvers() -> None:
    # use_cache=True: one value per process, and Hydra copies the submitting process's cache
    # into every submitit job, so a sweep's jobs all agree on its directory.
    if not OmegaConf.has_resolver("chatlm_stamp"):
        OmegaConf.register_new_resolver("chatlm_stamp", lambda part: stamp.current()[part], use_cache=True)
    if not OmegaConf.has_resolver("chatlm_dirname"):
        OmegaConf.register_new_resolver("chatlm_dirname", safe_dirname)
    if not OmegaConf.has_resolver("chatlm_path"):
        OmegaConf.register_new_resolver("chatlm_path", lambda p: str(Path(os.path.expanduser(str(p))).absolute()))


register_configs()
register_resolvers()


# ----------------------------------------------------------------------------------------------
# friendly errors


class UsageError(Exception):
    """Bad command-line input, reported as one message with exit code 2."""


def _schema_field(cls: type, name: str) -> Any:
    return getattr(cls, "__dataclass_fields__", {}).get(name)


def check_overrides(stage: str, args: list[str]) -> None:
    """Reject an override of a key that no schema has, suggesting the closest real key.

    Hydra would also refuse it, but its message does not say what was meant. Group choices
    (`model=d25x`) are left to Hydra, whose message lists the valid options.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    schema = C.STAGE_SCHEMAS.get(stage)
    candidates = [a for a in args if a and not a.startswith("-") and "=" in a]
    if schema is None or not candidates:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:
        return  # syntax errors: Hydra reports them with position information
    groups = set(config_groups())
    for ov in overrides:
        key = ov.key_or_group
        if ov.is_delete() or key.startswith("hydra") or key in groups or ov.package:
            continue
        cls, walked = schema, []
        for part in key.split("."):
            f = _schema_field(cls, part)
            if f is None:
                known = C.schema_fields(cls)
                where = ".".join(walked) or "the top level"
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" Did you mean '{'.'.join(walked + close)}'?" if close else ""
                raise UsageError(
                    f"unknown config key '{key}': '{part}' is not a key of {where}.{hint}\n"
                    f"  valid keys of {where}: {', '.join(known)}"
                )
            walked.append(part)
            cls = _resolve_field_type(cls, part)
            if cls is None:
                break  # a leaf or a container: the value's type is Hydra's job


def _resolve_field_type(cls: type, name: str) -> Optional[type]:
    """The dataclass type of a field, if it is one (schemas use `from __future__` annotations)."""
    import typing

    hints = typing.get_type_hints(cls)
    t = hints.get(name)
    return t if hasattr(t, "__dataclass_fields__") else None


def to_typed(cfg: DictConfig) -> Any:
    """A composed DictConfig as its dataclass (runs every schema's validation)."""
    return OmegaConf.to_object(cfg)


def resolved_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# the entry point


def run_stage(stage: str, body: StageBody) -> Any:
    """Run stage `stage` (config `conf/<stage>.yaml`) with `body(cfg, run)` on every rank."""
    body = _importable(body)
    info = dist.detect()
    store = None
    if info.world_size > 1 and info.launcher in ("torchrun", "slurm", "env"):
        # Every rank runs Hydra itself here: agree on one timestamp + suffix so all compose the
        # same run directory, and let only rank 0 write Hydra's .hydra/ files.
        agreed, store = dist.agree_on_stamp(info)
        stamp.set_current(agreed)
        if info.rank != 0:
            sys.argv.append("hydra.output_subdir=null")
    try:
        check_overrides(stage, sys.argv[1:])
    except UsageError as e:
        print(f"chatlm {stage}: error: {e}", file=sys.stderr)
        sys.exit(2)

    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=stage, version_base="1.3")
    def task(cfg: DictConfig) -> Any:
        return _task(stage, cfg, body, store)

    result = task()
    from chatlm.hydra_callbacks import take_failure

    failure = take_failure()
    if failure:
        print(f"chatlm {stage}: error: {failure}", file=sys.stderr)
        sys.exit(1)
    return result


def _importable(body: StageBody) -> StageBody:
    """`python -m chatlm.X` defines the body in `__main__`; refer to it through its real module so
    spawned ranks and submitit jobs (other processes) can import it by name."""
    if getattr(body, "__module__", None) == "__main__":
        import importlib

        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None and spec.name != "__main__":
            return getattr(importlib.import_module(spec.name), body.__name__)
    return body


def _user_error(e: BaseException) -> Optional[str]:
    """The message of a ChatlmError (also when it was raised on a spawned rank), else None."""
    from chatlm.errors import ChatlmError

    if isinstance(e, ChatlmError):
        return str(e)
    # torch.multiprocessing re-raises a rank's exception as ProcessRaisedException carrying its
    # formatted traceback; its last line is "<module>.<Class>: <message>".
    text = str(e).strip().splitlines()
    if type(e).__name__ == "ProcessRaisedException" and text:
        last = text[-1]
        for cls in _chatlm_error_names():
            if last.startswith(cls + ":"):
                return last[len(cls) + 1 :].strip()
    return None


def _chatlm_error_names() -> list[str]:
    from chatlm.errors import ChatlmError

    seen, todo = [], [ChatlmError]
    while todo:
        cls = todo.pop()
        seen.append(f"{cls.__module__}.{cls.__qualname__}")
        todo.extend(cls.__subclasses__())
    return seen


def _remove_unused_run_dir(path: Path) -> None:
    """Hydra creates the run directory before the config can be validated: take it back (and
    its empty parents) when the config is refused, so bad input leaves nothing behind."""
    import shutil

    if path.is_dir() and {p.name for p in path.iterdir()} <= {".hydra"}:
        shutil.rmtree(path, ignore_errors=True)
        for parent in list(path.parents)[:3]:
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break


def _task(stage: str, cfg: DictConfig, body: StageBody, store: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Detect here, not before Hydra: under submitit this runs in the job's own processes.
    info = dist.detect()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job = JobInfo(
        stage=stage,
        run_dir=str(Path(hc.runtime.output_dir).absolute()),
        output_root=str(Path(os.path.expanduser(str(cfg.paths.output_root))).absolute()),
        multirun=multirun,
        sweep_dir=str(Path(hc.sweep.dir).absolute()) if multirun else None,
        job_num=int(hc.job.num) if multirun else None,
        override_dirname=str(hc.job.override_dirname) if multirun else None,
        overrides=list(hc.overrides.task),
        choices={
            k: v
            for k, v in OmegaConf.to_container(hc.runtime.choices).items()
            if not k.startswith("hydra/") and v is not None
        },
        argv=_user_argv(hc, multirun),
    )
    try:
        typed = to_typed(cfg)
    except C.ConfigError as e:
        if not multirun:
            _remove_unused_run_dir(Path(job.run_dir))
            print(f"chatlm {stage}: config error: {e}", file=sys.stderr)
            sys.exit(2)
        # one bad point of a sweep: record it as a failed job and let the others run
        run = Run(Path(job.run_dir))
        run.begin(job, resolved_container(cfg), resume="auto")
        run.finish("failed", e)
        return {"status": "failed", "error": f"config error: {e}"}
    try:
        return dist.launch(
            run_rank,
            (body, typed, resolved_container(cfg), job),
            info=info,
            nproc_per_node=typed.hardware.nproc_per_node,
            store=store,
            device=typed.hardware.device.value,
        )
    except BaseException as e:
        from chatlm.runtime.rundir import Preempted

        if isinstance(e, Preempted) and e.requeue is not None:
            return _hand_over_to_requeue(e, job, info)
        # Ranks that were killed (or a rank 0 stuck in a collective when another rank died)
        # cannot close their record: close it here.
        from chatlm.runtime.rundir import mark_failed_if_running

        if info.world_size == 1 and (Path(job.run_dir) / "run.json").exists():
            mark_failed_if_running(job.run_dir, e)
        if isinstance(e, KeyboardInterrupt):
            raise
        if not multirun:
            user_error = _user_error(e)
            if user_error is None:
                raise
            print(f"chatlm {stage}: error: {user_error}\n  (run directory: {job.run_dir})", file=sys.stderr)
            sys.exit(1)
        # In a sweep, one failed job must not stop the others or skip the sweep summary:
        # the failure is in the job's run.json, and the summary callback fails the sweep at the end.
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def _user_argv(hc: Any, multirun: bool) -> list[str]:
    """The command the user typed. Inside a submitit job this process runs `submitit.core._submit`;
    the submitting command is in the sweep record (sweep.json) that chatlm's launcher wrote."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if multirun and any("submitit" in a for a in argv[:4]):
        from chatlm.runs.summary import read_sweep_record

        record = read_sweep_record(Path(str(hc.sweep.dir))) or {}
        return list(record.get("argv") or argv)
    return argv


def _hand_over_to_requeue(e: Any, job: JobInfo, info: dist.RankInfo) -> Any:
    """The stage saved a checkpoint after submitit's USR2: now let submitit requeue the job.

    On rank 0 submitit's handler stores the resubmission and runs `scontrol requeue`, then exits;
    the other ranks leave too, without a result, so the launcher keeps waiting for the requeued job,
    which lands in the same run directory and resumes (resume=auto). When submitit refuses (the job
    timed out `max_num_timeout` times), the run is closed as failed with its checkpoint in place.
    """
    try:
        e.requeue(e.signum, None)
    except Exception as refused:  # submitit: "Job not requeued because: timed-out too many times."
        message = (
            f"{refused}; the last checkpoint is in {job.run_dir}: continue with "
            f"`chatlm runs retry --resume <sweep dir>` or hydra.run.dir=<that directory>"
        )
        if info.rank == 0:
            Run(Path(job.run_dir)).finish("failed", message)
        return {"status": "failed", "error": message}
    raise SystemExit(-1)
