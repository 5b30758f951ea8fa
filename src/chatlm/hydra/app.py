"""The entry of every stage app: `run_stage(<stage>, <body>)`.

compose (Hydra) -> typed config (chatlm.config) -> rank setup (chatlm.runtime.dist) -> run
directory (chatlm.runtime.rundir) -> `body(cfg, run)`, a plain library function.

It also makes all ranks of a `torchrun`/`srun` launch agree on one run directory before Hydra
composes, answers `--help` with the stage's own help (and `--plan` with the values a run would
derive, without running it), and turns a `ChatlmError` into its one line and exit code
(`chatlm.errors`); a run's own record keeps the traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from chatlm.config.tree import conf_dir
from chatlm.errors import ChatlmError, ConfigError, Preempted, UsageError
from chatlm.hydra import store  # noqa: F401 - registers the schemas and resolvers
from chatlm.hydra.overrides import check_overrides
from chatlm.runtime import dist, stamp
from chatlm.runtime.quiet_exit import at_exit_silence_stderr
from chatlm.runtime.rundir import JobInfo, Run, mark_failed_if_running, run_rank

StageBody = Callable[[Any, Run], Optional[dict]]
PlanFn = Callable[[Any], str]


def to_typed(cfg: DictConfig) -> Any:
    """A composed DictConfig as its dataclass (runs every schema's validation)."""
    return OmegaConf.to_object(cfg)


def resolved_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def fail(stage: str, error: ChatlmError, run_dir: Optional[str] = None) -> None:
    """Print a ChatlmError as its one line (and where the run's files are) and exit with its code."""
    where = f"\n  (run directory: {run_dir})" if run_dir else ""
    print(f"chatlm {stage}: {error.label}: {error}{where}", file=sys.stderr)
    sys.exit(error.exit_code)


def run_stage(stage: str, body: StageBody, *, plan: Optional[PlanFn] = None) -> Any:
    """Run stage `stage` (config `conf/<stage>.yaml`) with `body(cfg, run)` on every rank.

    `plan(cfg) -> text`: what `--plan` prints (the derived sizes of a run) instead of running it."""
    at_exit_silence_stderr()
    body = _importable(body)
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        from chatlm.hydra.help import stage_help

        print(stage_help(stage))
        sys.exit(0)
    want_plan = "--plan" in args
    if want_plan:
        if plan is None:
            fail(stage, UsageError(f"--plan is not available for chatlm.{stage}"))
        sys.argv.remove("--plan")
    info = dist.detect()
    rank_store = None
    if info.world_size > 1 and info.launcher in ("torchrun", "slurm", "env"):
        # Every rank runs Hydra itself here: agree on one timestamp + suffix so all compose the
        # same run directory, and let only rank 0 write Hydra's .hydra/ files.
        agreed, rank_store = dist.agree_on_stamp(info)
        stamp.set_current(agreed)
        if info.rank != 0:
            sys.argv.append("hydra.output_subdir=null")
    try:
        check_overrides(stage, sys.argv[1:])
    except UsageError as e:
        fail(stage, e)
    if want_plan:
        return _print_plan(stage, plan, sys.argv[1:])

    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=stage, version_base="1.3")
    def task(cfg: DictConfig) -> Any:
        return _task(stage, cfg, body, rank_store)

    result = task()
    from chatlm.hydra.callbacks import take_failure

    failure = take_failure()
    if failure:
        print(f"chatlm {stage}: error: {failure}", file=sys.stderr)
        sys.exit(1)
    return result


def _print_plan(stage: str, plan: PlanFn, overrides: list[str]) -> None:
    """Compose without a run directory and print what `plan` derives from the typed config."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=[o for o in overrides if not o.startswith("hydra.")])
    try:
        print(plan(to_typed(cfg)))
    except ChatlmError as e:
        fail(stage, e)


def _importable(body: StageBody) -> StageBody:
    """`python -m chatlm.X` defines the body in `__main__`; refer to it through its real module so
    spawned ranks and submitit jobs (other processes) can import it by name."""
    if getattr(body, "__module__", None) == "__main__":
        import importlib

        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None and spec.name != "__main__":
            return getattr(importlib.import_module(spec.name), body.__name__)
    return body


def _remove_unused_run_dir(path: Path) -> None:
    """Hydra creates the run directory before the config can be validated: take it back (and
    its empty parents) when the config is refused, so bad input leaves nothing behind."""
    if path.is_dir() and {p.name for p in path.iterdir()} <= {".hydra"}:
        shutil.rmtree(path, ignore_errors=True)
        for parent in list(path.parents)[:3]:
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break


def _job_info(stage: str, cfg: DictConfig) -> JobInfo:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    choices = OmegaConf.to_container(hc.runtime.choices)
    return JobInfo(
        stage=stage,
        run_dir=str(Path(hc.runtime.output_dir).absolute()),
        output_root=str(Path(os.path.expanduser(str(cfg.paths.output_root))).absolute()),
        multirun=multirun,
        sweep_dir=str(Path(hc.sweep.dir).absolute()) if multirun else None,
        job_num=int(hc.job.num) if multirun else None,
        override_dirname=str(hc.job.override_dirname) if multirun else None,
        overrides=list(hc.overrides.task),
        choices={k: v for k, v in choices.items() if not k.startswith("hydra/") and v is not None},
        argv=_user_argv(hc, multirun),
    )


def _typed_or_refused(stage: str, cfg: DictConfig, job: JobInfo) -> tuple[Any, Optional[dict]]:
    """(typed config, None), or (None, a failed job's result) for a bad point of a sweep. A bad
    single run is refused here: one line, exit 2, no run directory left behind."""
    try:
        typed = to_typed(cfg)
        dist.resolve_device_type(typed.hardware.device.value, preset=typed.hardware.name)
        return typed, None
    except ConfigError as e:
        if not job.multirun:
            _remove_unused_run_dir(Path(job.run_dir))
            fail(stage, e)
        # one bad point of a sweep: record it as a failed job and let the others run
        run = Run(Path(job.run_dir))
        run.begin(job, resolved_container(cfg), resume="auto")
        run.finish("failed", e)
        return None, {"status": "failed", "error": f"config error: {e}"}


def _task(stage: str, cfg: DictConfig, body: StageBody, rank_store: Any) -> Any:
    # Detect here, not before Hydra: under submitit this runs in the job's own processes.
    info = dist.detect()
    job = _job_info(stage, cfg)
    typed, refused = _typed_or_refused(stage, cfg, job)
    if refused is not None:
        return refused
    try:
        return dist.launch(
            run_rank,
            (body, typed, resolved_container(cfg), job),
            info=info,
            nproc_per_node=typed.hardware.nproc_per_node,
            store=rank_store,
            device=typed.hardware.device.value,
        )
    except BaseException as e:
        if isinstance(e, Preempted) and e.requeue is not None:
            return _hand_over_to_requeue(e, job, info)
        # Ranks that were killed (or a rank 0 stuck in a collective when another rank died)
        # cannot close their record: close it here.
        if info.world_size == 1 and (Path(job.run_dir) / "run.json").exists():
            mark_failed_if_running(job.run_dir, e)
        if job.multirun and not isinstance(e, KeyboardInterrupt):
            # One failed job must not stop the others or skip the sweep summary: the failure is in
            # the job's run.json, and the summary callback fails the sweep at the end.
            return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        if isinstance(e, ChatlmError):
            fail(stage, e, job.run_dir)
        raise


def _user_argv(hc: Any, multirun: bool) -> list[str]:
    """The command the user typed. Inside a submitit job this process runs `submitit.core._submit`;
    the submitting command is in the sweep record (sweep.json) that chatlm's launcher wrote."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if multirun and any("submitit" in a for a in argv[:4]):
        from chatlm.runs.summary import read_sweep_record

        record = read_sweep_record(Path(str(hc.sweep.dir))) or {}
        return list(record.get("argv") or argv)
    return argv


def _hand_over_to_requeue(e: Preempted, job: JobInfo, info: dist.RankInfo) -> Any:
    """The stage saved a checkpoint after submitit's USR2: now let submitit requeue the job.

    On rank 0 submitit's handler stores the resubmission and runs `scontrol requeue`, then exits;
    the other ranks leave too, without a result, so the launcher keeps waiting for the requeued job,
    which lands in the same run directory and resumes (resume=auto). When submitit refuses (the job
    timed out `max_num_timeout` times), the run is closed as failed with its checkpoint in place.
    """
    assert e.requeue is not None
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
