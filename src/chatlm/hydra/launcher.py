"""chatlm's Hydra launchers: hydra-submitit-launcher's, made safe to operate.

`conf/hydra/launcher/*.yaml` use them (the concrete classes sit in `hydra_plugins.chatlm_launcher`,
where Hydra's plugin discovery looks). Over the plugin's own launchers they add:

- **checks before submitting** (Slurm only): Slurm installed and answering, the partition exists,
  and it has the nodes, GPUs and CPUs asked for. Bad input gets one line, not an sbatch error later.
- **a sweep record**: `<sweep dir>/sweep.json` lists every point (job number, overrides, run
  directory, Slurm job id, log files) and the command that made the sweep. `chatlm runs retry`
  reads it to re-submit only failed or missing points into the same directories.
- **no sweep lost to one job**: a job that Slurm kills (time limit after the last requeue,
  `scancel`, a dead node) is reported as failed, its run.json closed as failed with the log path,
  and the other jobs' results are still collected, so the sweep summary is always written.
- **one writer per run directory**: in a job of several tasks (ranks), only rank 0 writes Hydra's
  `.hydra/` files.
- `only_jobs`: submit a subset of the sweep's points (the ones `chatlm runs retry` picked).

Requeue on time limit or preemption is submitit's: the launcher is "checkpointable", and chatlm's
training loop saves a checkpoint before handing the USR2 signal on (see `chatlm.runtime.signals.StopSignal`);
the requeued job lands in the same run directory and resumes from it (`resume=auto`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from chatlm.errors import LaunchError
from chatlm.runs.summary import read_sweep_record, write_sweep_record
from chatlm.runtime.rundir import SCHEMA_VERSION, mark_failed_if_running, now_iso
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

log = logging.getLogger("chatlm")

_submitted_only: Optional[dict] = None


def take_submitted() -> Optional[dict]:
    """Set when the last launch submitted without waiting ({'sweep_dir', 'jobs'}); forgets it."""
    global _submitted_only
    value, _submitted_only = _submitted_only, None
    return value


# ----------------------------------------------------------------------------------------------
# schemas (registered as hydra/launcher options `chatlm_slurm` and `chatlm_local`)


@dataclass
class ChatlmSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.chatlm_launcher.launchers.ChatlmSlurmLauncher"
    only_jobs: Optional[List[int]] = None  # submit only these job numbers of the sweep (None: all)
    preflight: bool = True  # check partition, nodes, GPUs and CPUs with sinfo before submitting
    wait: bool = True  # wait for the jobs and summarize; false: submit, print where to look, exit


@dataclass
class ChatlmLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.chatlm_launcher.launchers.ChatlmLocalLauncher"
    only_jobs: Optional[List[int]] = None  # submit only these job numbers of the sweep (None: all)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="chatlm_slurm", node=ChatlmSlurmConf, provider="chatlm")
    cs.store(group="hydra/launcher", name="chatlm_local", node=ChatlmLocalConf, provider="chatlm")


# ----------------------------------------------------------------------------------------------
# checks before submitting


def _run(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def gpus_in_gres(gres: str) -> int:
    """GPUs a node offers, from sinfo's %G: 'gpu:2', 'gpu:h100:8(S:0-1)', 'gpu:a:2,gpu:b:2' -> 2, 8, 4."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


@dataclass
class Partition:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    default: bool = False


def partitions() -> dict[str, Partition]:
    """Partitions as sinfo reports them (per partition: node count, the largest node's CPUs and GPUs)."""
    p = _run(["sinfo", "-h", "-o", "%P|%D|%c|%G"])
    if p.returncode != 0:
        raise LaunchError(f"sinfo failed: {p.stderr.strip() or p.stdout.strip()}")
    found: dict[str, Partition] = {}
    for line in p.stdout.splitlines():
        try:
            name, nodes, cpus, gres = line.strip().split("|")
        except ValueError:
            continue
        default = name.endswith("*")
        name = name.rstrip("*")
        cpus_n = int(re.sub(r"\D.*", "", cpus) or 0)
        part = found.setdefault(name, Partition(name, 0, 0, 0, default))
        part.nodes += int(nodes or 0)
        part.cpus_per_node = max(part.cpus_per_node, cpus_n)
        part.gpus_per_node = max(part.gpus_per_node, gpus_in_gres(gres))
    return found


def check_slurm_request(params: dict) -> Partition:
    """Refuse a Slurm request that cannot be scheduled; return the partition it will run on."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise LaunchError(
            "Slurm is not installed here (no sbatch/sinfo on PATH). Submit from a Slurm login node, "
            "or run locally with cluster=local (one process) or cluster=submitit_local."
        )
    ping = _run(["scontrol", "ping"])
    if ping.returncode != 0 or "UP" not in ping.stdout:
        raise LaunchError(
            f"no Slurm controller answers `scontrol ping` from this machine: {(ping.stdout + ping.stderr).strip()}"
        )
    parts = partitions()
    wanted = params.get("partition")
    if wanted:
        if wanted not in parts:
            raise LaunchError(
                f"Slurm partition '{wanted}' does not exist here; partitions: "
                f"{', '.join(sorted(parts)) or '(none)'}. Set CHATLM_PARTITION, conf/local/default.yaml "
                "or hydra.launcher.partition."
            )
        part = parts[wanted]
    else:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise LaunchError(
                "no partition given and this cluster has no default partition; partitions: "
                f"{', '.join(sorted(parts))}. Set CHATLM_PARTITION or hydra.launcher.partition."
            )
        part = defaults[0]
    nodes = int(params.get("nodes") or 1)
    if nodes > part.nodes:
        raise LaunchError(f"the job asks for {nodes} nodes but partition '{part.name}' has {part.nodes}")
    gpus = int(params.get("gpus_per_node") or 0)
    if gpus > part.gpus_per_node:
        raise LaunchError(
            f"the job asks for {gpus} GPUs per node but the nodes of partition '{part.name}' have "
            f"at most {part.gpus_per_node} (hardware.nproc_per_node sets GPUs and tasks per node)"
        )
    cpus = int(params.get("tasks_per_node") or 1) * int(params.get("cpus_per_task") or 1)
    if part.cpus_per_node and cpus > part.cpus_per_node:
        raise LaunchError(
            f"the job asks for {cpus} CPUs per node (tasks_per_node x cpus_per_task) but the nodes of "
            f"partition '{part.name}' have {part.cpus_per_node}; lower hydra.launcher.cpus_per_task"
        )
    return part


# ----------------------------------------------------------------------------------------------
# the launchers


class ChatlmLauncherMixin:
    """Mixed into the plugin's launchers (see the module docstring)."""

    _EXECUTOR: str

    def __init__(self, **params: Any) -> None:
        self.only_jobs = params.pop("only_jobs", None)
        self.preflight = bool(params.pop("preflight", True))
        self.wait = bool(params.pop("wait", True)) or self._EXECUTOR == "local"
        super().__init__(**params)  # type: ignore[call-arg]

    # -- in the job --------------------------------------------------------------------------

    def __call__(
        self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: dict
    ) -> JobReturn:
        import submitit

        if submitit.JobEnvironment().global_rank != 0:
            # every task runs the job function; only rank 0 writes .hydra/ into the shared directory
            sweep_overrides = list(sweep_overrides) + ["hydra.output_subdir=null"]
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)  # type: ignore[misc]

    # -- in the submitting process -----------------------------------------------------------

    def _job_dir(self, overrides: Sequence[str], job_num: int) -> str:
        """The run directory a job will use (what Hydra's run_job will compute in the job)."""
        assert self.hydra_context is not None and self.config is not None  # type: ignore[attr-defined]
        saved = HydraConfig.instance().cfg
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))  # type: ignore
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = job_num
                cfg.hydra.job.id = f"job_id_for_{job_num}"
            HydraConfig.instance().set_config(cfg)
            return str(Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute())
        finally:
            if saved is not None:
                HydraConfig.instance().set_config(saved)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None  # type: ignore[attr-defined]
        params = self.params  # type: ignore[attr-defined]
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()  # type: ignore[attr-defined]
        numbered = [(initial_job_idx + i, list(ov)) for i, ov in enumerate(job_overrides)]
        if self.only_jobs is not None:
            wanted = set(int(j) for j in self.only_jobs)
            unknown = sorted(wanted - {n for n, _ in numbered})
            if unknown:
                _fail(
                    f"only_jobs names job numbers this sweep does not have: {unknown} "
                    f"(it has {numbered[0][0]}..{numbered[-1][0]})",
                    sweep_dir,
                )
            numbered = [(n, ov) for n, ov in numbered if n in wanted]
        if self._EXECUTOR == "slurm" and self.preflight:
            try:
                part = check_slurm_request(params)
                log.info(
                    "Slurm partition %s: %d nodes, %d CPUs and %d GPUs per node",
                    part.name,
                    part.nodes,
                    part.cpus_per_node,
                    part.gpus_per_node,
                )
            except LaunchError as e:
                _fail(str(e), sweep_dir)

        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = self._executor(params)
        log.info("submitit %s: %d job(s) into %s", self._EXECUTOR, len(numbered), sweep_dir)
        jobs_info = []
        for num, ov in numbered:
            log.info("\t#%d : %s", num, " ".join(filter_overrides(ov)))
            jobs_info.append({"num": num, "overrides": ov, "run_dir": self._job_dir(ov, num)})
        record = self._merge_record(sweep_dir, jobs_info)
        write_sweep_record(sweep_dir, record)

        from hydra.core.singleton import Singleton

        args = [(ov, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()) for num, ov in numbered]
        jobs = executor.map_array(self, *zip(*args))
        for info, job in zip(jobs_info, jobs):
            info.update(
                job_id=job.job_id,
                stdout=str(job.paths.stdout).replace("%t", "0"),
                stderr=str(job.paths.stderr).replace("%t", "0"),
                submitted=now_iso(),
            )
            log.info("\t#%d -> job %s (log: %s)", info["num"], job.job_id, info["stdout"])
        record = self._merge_record(sweep_dir, jobs_info)
        write_sweep_record(sweep_dir, record)
        if not self.wait:
            global _submitted_only
            _submitted_only = {"sweep_dir": str(sweep_dir), "jobs": [i["job_id"] for i in jobs_info]}
            return [
                JobReturn(
                    overrides=i["overrides"],
                    status=JobStatus.COMPLETED,
                    _return_value={"status": "submitted", "job_id": i["job_id"]},
                )
                for i in jobs_info
            ]

        results = []
        for info, job in zip(jobs_info, jobs):
            results.append(self._collect(job, info))
        write_sweep_record(sweep_dir, self._merge_record(sweep_dir, jobs_info))
        return results

    def _executor(self, params: dict) -> Any:
        import submitit

        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init = {"folder": params["submitit_folder"]}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in base else f"{self._EXECUTOR}_{k}": v
                for k, v in params.items()
                if k not in ("submitit_folder", "max_num_timeout")
            }
        )
        return executor

    def _merge_record(self, sweep_dir: Path, jobs_info: list[dict]) -> dict:
        """sweep.json: the first launch writes it; a retry updates the points it re-submitted."""
        cfg = self.config  # type: ignore[attr-defined]
        record = read_sweep_record(sweep_dir) or {
            "stage": str(cfg.get("stage", "")),
            "sweep_dir": str(sweep_dir),
            "created": now_iso(),
            "argv": list(getattr(sys, "orig_argv", sys.argv)),
            "cwd": os.getcwd(),
            "task_overrides": list(OmegaConf.to_container(cfg.hydra.overrides.task)),
            "hydra_overrides": list(OmegaConf.to_container(cfg.hydra.overrides.hydra)),
            "jobs": [],
        }
        record["launcher"] = {
            "executor": self._EXECUTOR,
            "target": f"{type(self).__module__}.{type(self).__name__}",
            "params": {k: v for k, v in self.params.items()},
        }  # type: ignore[attr-defined]
        by_num = {j["num"]: j for j in record.get("jobs", [])}
        for info in jobs_info:
            by_num.setdefault(info["num"], {}).update(info)
        record["jobs"] = [by_num[n] for n in sorted(by_num)]
        return record

    def _collect(self, job: Any, info: dict) -> JobReturn:
        """Rank 0's result of one job; a job Slurm killed becomes a failed result, not an exception."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            ret = job.task(0).result() if job.num_tasks > 1 else job.result()
            info["state"] = "finished"
            return ret
        except (UncompletedJobError, FailedJobError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = f"Slurm job {job.job_id} ended without a result: {first} (log: {info.get('stderr')})"
            info["state"] = "killed"
            info["error"] = message
            log.error("job #%d: %s", info["num"], message)
            run_json = Path(info["run_dir"]) / "run.json"
            if run_json.exists():
                mark_failed_if_running(info["run_dir"], message)
            else:  # it never started: leave a record so the summary and `runs retry` see the point
                _record_unstarted(info, message, str(self.config.get("stage", "")))  # type: ignore[attr-defined]
            return JobReturn(
                overrides=info["overrides"],
                status=JobStatus.COMPLETED,
                _return_value={"status": "failed", "error": message},
            )


def _record_unstarted(info: dict, message: str, stage: str) -> None:
    from chatlm.runtime.rundir import write_json

    path = Path(info["run_dir"])
    path.mkdir(parents=True, exist_ok=True)
    write_json(
        path / "run.json",
        {
            "schema_version": SCHEMA_VERSION,
            "stage": stage,
            "run_dir": str(path),
            "status": "failed",
            "start_time": None,
            "end_time": now_iso(),
            "overrides": info["overrides"],
            "attempts": [],
            "final_metrics": {},
            "error": {"type": "JobKilled", "message": message, "traceback": None},
        },
    )


def _fail(message: str, sweep_dir: Path) -> None:
    """Refuse the launch: one line, exit status 2, and no sweep directory left behind if this launch
    created it (Hydra writes multirun.yaml before the launcher runs)."""
    print(f"chatlm: launch error: {message}", file=sys.stderr)
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    sys.exit(2)
