"""The run-directory contract: what every chatlm run leaves behind, and who writes it.

```
<output_root>/<stage>/<date>/<time>-<4 hex>_<run_name>/      (a sweep job: <sweep dir>/<N>_<overrides>/)
  .hydra/               Hydra's own files (config.yaml there is *unresolved*)
  config.resolved.yaml  the config with every interpolation resolved, plus `derived:` values
  run.json              stage, status, times, git, versions, hardware, world size, Slurm ids, argv,
                        overrides, final metrics, error; one entry per attempt (requeues, resumes)
  metrics.jsonl         one JSON object per logged step
  logs/rank<r>.log      each rank's log
<output_root>/<stage>/latest -> the newest single run of that stage
```

Only rank 0 writes config.resolved.yaml, run.json and metrics.jsonl; every rank writes its own log.
A directory that already holds a run is reused only to resume the same config (`resume=auto` and
an equal config hash); anything else is refused with the keys that differ.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

from chatlm.errors import ChatlmError, Preempted
from chatlm.runtime.metrics import MetricsWriter

log = logging.getLogger("chatlm")

SCHEMA_VERSION = 1
STATUSES = ("running", "completed", "failed", "preempted", "interrupted")


class RunDirError(ChatlmError, RuntimeError):
    """The run directory cannot be used as asked (exists with another config, not empty...)."""


@dataclass
class JobInfo:
    """What the Hydra edge knows about this job, handed to every rank."""

    stage: str
    run_dir: str
    output_root: str
    multirun: bool = False
    sweep_dir: Optional[str] = None
    job_num: Optional[int] = None
    override_dirname: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# small file helpers


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + fsync + rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="milliseconds")


def update_latest_link(link: Path, target: Path) -> None:
    """Point `link` at `target` (relative, replaced atomically so concurrent runs never break it)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------------------------
# config hashing


def hashed_view(cfg: dict) -> dict:
    """The config as hashed: without the keys its stage declares `results=False` (chatlm.config.keys)."""
    from chatlm.config.keys import without_non_result_keys

    return without_non_result_keys(json.loads(json.dumps(cfg, default=str)))


def config_hash(cfg: dict) -> str:
    """sha256 of the canonical JSON of the config, minus the keys that do not change results."""
    blob = json.dumps(hashed_view(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_diff(old: dict, new: dict) -> list[str]:
    """Human-readable 'key: old -> new' lines for the hashed keys that differ."""
    a, b = flatten(hashed_view(old)), flatten(hashed_view(new))
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


# ----------------------------------------------------------------------------------------------
# provenance


def git_info(path: Path | None = None) -> Optional[dict]:
    """sha / dirty flag / branch of the git checkout holding the chatlm package (None if none)."""
    path = path or Path(__file__).resolve().parent
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        sha = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
        diff = git("diff", "HEAD") if status else ""
        return {
            "sha": sha,
            "dirty": bool(status),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        }
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(
    names: Iterable[str] = (
        "chatlm",
        "torch",
        "hydra-core",
        "omegaconf",
        "submitit",
        "hydra-submitit-launcher",
        "numpy",
        "pyarrow",
        "tiktoken",
        "rustbpe",
        "triton",
        "flash-attn-4",
        "wandb",
    ),
) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware_info() -> dict:
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def slurm_info(env: dict | None = None) -> Optional[dict]:
    env = dict(os.environ) if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    keys = {
        "job_id": "SLURM_JOB_ID",
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "restart_count": "SLURM_RESTART_COUNT",
        "nodelist": "SLURM_JOB_NODELIST",
        "partition": "SLURM_JOB_PARTITION",
        "ntasks": "SLURM_NTASKS",
    }
    return {k: env[v] for k, v in keys.items() if v in env}


# ----------------------------------------------------------------------------------------------
# the run


class Run:
    """A run directory seen from one rank. Rank 0 writes the record; all ranks may log."""

    def __init__(self, path: Path, rank: int = 0, world_size: int = 1, ctx: Any = None):
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self.ctx = ctx  # chatlm.runtime.dist.DistContext on live runs (None in tools/tests)
        self.policy: Any = None  # chatlm.runtime.device.DevicePolicy on live runs
        self.metrics: Optional[MetricsWriter] = None
        self.final_metrics: dict[str, Any] = {}
        self.resolved: dict[str, Any] = {}  # the resolved config (set on live runs)
        self.resumed = False
        self._log_handler: Optional[logging.Handler] = None
        self._latest_link: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def record_path(self) -> Path:
        return self.path / "run.json"

    def record(self) -> dict:
        return read_json(self.record_path) or {}

    # -- creation ------------------------------------------------------------------------------

    def begin(
        self,
        job: JobInfo,
        config: dict,
        *,
        resume: str = "auto",
        world_size: int = 1,
        launcher: str = "single",
        derived: dict | None = None,
    ) -> None:
        """Rank 0: claim the directory (new, or a resumption of the same config) and write the record."""
        self.path.mkdir(parents=True, exist_ok=True)
        chash = config_hash(config)
        previous = read_json(self.record_path)
        foreign = [
            p.name for p in self.path.iterdir() if p.name not in (".hydra", "logs") and not p.name.startswith(".")
        ]
        attempts: list[dict] = []
        if previous is not None:
            if resume == "never":
                raise RunDirError(
                    f"{self.path} already holds a run (status {previous.get('status')!r}) and "
                    "resume=never; choose another run directory or resume=auto"
                )
            if previous.get("config_hash") != chash:
                old_cfg = self._read_resolved() or {}
                diff = config_diff(old_cfg, config) or ["(config.resolved.yaml missing: cannot list keys)"]
                raise RunDirError(
                    f"{self.path} holds a run with a different config; refusing to reuse it. "
                    "Differing keys:\n  " + "\n  ".join(diff)
                )
            attempts = list(previous.get("attempts", []))
            self.resumed = True
        elif foreign:
            raise RunDirError(
                f"{self.path} is not empty ({', '.join(sorted(foreign)[:5])}) and has no run.json: "
                "refusing to write a run into it"
            )
        attempts.append(
            {
                "start": now_iso(),
                "end": None,
                "status": "running",
                "host": socket.gethostname(),
                "slurm": slurm_info(),
                "world_size": world_size,
            }
        )
        resolved = dict(config)
        resolved["derived"] = dict(derived or {})
        atomic_write_text(self.path / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
        record = {
            "schema_version": SCHEMA_VERSION,
            "stage": job.stage,
            "run_name": config.get("run_name"),
            "run_dir": str(self.path),
            "status": "running",
            "start_time": (previous or {}).get("start_time", attempts[-1]["start"]),
            "end_time": None,
            "duration_s": None,
            "config_hash": chash,
            "git": git_info(),
            "versions": package_versions(),
            "hardware": hardware_info(),
            "world_size": world_size,
            "launcher": launcher,
            "slurm": slurm_info(),
            "argv": job.argv,
            "overrides": job.overrides,
            "choices": job.choices,
            "sweep": (
                {"dir": job.sweep_dir, "job_num": job.job_num, "override_dirname": job.override_dirname}
                if job.multirun
                else None
            ),
            "attempts": attempts,
            "final_metrics": (previous or {}).get("final_metrics", {}),
            "error": None,
        }
        write_json(self.record_path, record)
        # <output_root>/<stage>/latest follows completed single runs only (set in finish)
        self._latest_link = None if job.multirun else Path(job.output_root) / job.stage / "latest"

    def _read_resolved(self) -> Optional[dict]:
        try:
            data = yaml.safe_load((self.path / "config.resolved.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(data, dict):
            data.pop("derived", None)
        return data

    # -- during the run ------------------------------------------------------------------------

    def open_metrics(self) -> None:
        if self.is_main and self.metrics is None:
            self.metrics = MetricsWriter(self.path / "metrics.jsonl")

    def log_metrics(self, **values: Any) -> None:
        """Append one line to metrics.jsonl (rank 0 only; other ranks' calls are ignored)."""
        if self.is_main:
            self.open_metrics()
            assert self.metrics is not None
            self.metrics.write(values)

    def set_final_metrics(self, **values: Any) -> None:
        self.final_metrics.update(values)

    def record_derived(self, **values: Any) -> None:
        """Add derived values (model width, batch size, horizon...) under `derived:` in config.resolved.yaml."""
        if not self.is_main:
            return
        path = self.path / "config.resolved.yaml"
        data = yaml.safe_load(path.read_text()) or {}
        data.setdefault("derived", {}).update(json.loads(json.dumps(values, default=str)))
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

    def update_record(self, **fields: Any) -> None:
        if self.is_main:
            record = self.record()
            record.update(fields)
            write_json(self.record_path, record)

    # -- the end -------------------------------------------------------------------------------

    def finish(self, status: str, error: BaseException | str | None = None, *, requeue: bool = False) -> None:
        """Rank 0: close the record with a final status, metrics and (if failed) the error.

        `requeue`: the job is about to be requeued (Slurm); the attempt records it."""
        assert status in STATUSES, status
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if not self.is_main:
            return
        record = self.record()
        end = now_iso()
        record["status"] = status
        record["end_time"] = end
        try:
            start = dt.datetime.fromisoformat(record["start_time"])
            record["duration_s"] = round((dt.datetime.fromisoformat(end) - start).total_seconds(), 3)
        except (KeyError, TypeError, ValueError):
            pass
        record.setdefault("final_metrics", {}).update(json.loads(json.dumps(self.final_metrics, default=str)))
        if error is not None:
            if isinstance(error, BaseException):
                record["error"] = {
                    "type": type(error).__name__,
                    "message": str(error),
                    "traceback": "".join(traceback.format_exception(error))[-20000:],
                }
            else:
                record["error"] = {"type": "Error", "message": str(error), "traceback": None}
        if record.get("attempts"):
            record["attempts"][-1].update(end=end, status=status)
            if requeue or "requeued" in record["attempts"][-1]:
                record["attempts"][-1]["requeued"] = requeue
            if error is not None:
                record["attempts"][-1]["reason"] = (
                    str(error).splitlines()[0][:300] if str(error) else type(error).__name__
                )
        write_json(self.record_path, record)
        if status == "completed" and self._latest_link is not None:
            update_latest_link(self._latest_link, self.path)

    # -- logging -------------------------------------------------------------------------------

    def attach_log(self) -> None:
        """Send the `chatlm` logger of this rank to logs/rank<r>.log (and, on rank 0, the console)."""
        path = self.path / "logs" / f"rank{self.rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self._log_handler = handler
        if self.rank != 0:  # only rank 0 talks on the console; every rank keeps its own file
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setLevel(logging.WARNING)

    def detach_log(self) -> None:
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def mark_failed_if_running(run_dir: str | Path, error: BaseException | str) -> None:
    """Used by a launcher that saw its ranks die: close a record that no rank could close."""
    run = Run(Path(run_dir))
    if run.record().get("status") == "running":
        run.finish("failed", error)


def resume_command(run: Run) -> str:
    """The command that continues a run in its directory: the same stage and overrides, that
    directory, resume=auto."""
    import shlex

    record = run.record()
    stage = record.get("stage") or (run.resolved or {}).get("stage", "train")
    keep = [o for o in record.get("overrides") or [] if not o.startswith(("hydra.run.dir=", "resume="))]
    return " ".join(["python -m chatlm." + stage, *map(shlex.quote, keep), shlex.quote(f"hydra.run.dir={run.path}")])


def resume_hint(run: Run) -> str:
    return f"continue with: {resume_command(run)}"


# ----------------------------------------------------------------------------------------------
# the per-rank driver used by chatlm.hydra.app


def _begin(run: Run, job: JobInfo, cfg: Any, resolved: dict) -> None:
    """Rank 0 claims the directory; every rank learns whether that worked (a barrier too)."""
    ctx, error = run.ctx, None
    if ctx.is_main:
        try:
            run.begin(
                job,
                resolved,
                resume=cfg.resume,
                world_size=ctx.world_size,
                launcher=ctx.info.launcher,
                derived={"world_size": ctx.world_size, "launcher": ctx.info.launcher, **run.policy.describe()},
            )
        except RunDirError as e:
            error = str(e)
    error = ctx.broadcast_object(error)  # doubles as the barrier: nobody starts before the record exists
    if error is not None:
        raise RunDirError(error)


def run_rank(ctx: Any, body: Callable[[Any, Run], Optional[dict]], cfg: Any, resolved: dict, job: JobInfo) -> Any:
    """On one rank: claim the run directory (rank 0), run `body(cfg, run)`, record the outcome."""
    from chatlm.runtime.device import DevicePolicy
    from chatlm.runtime.signals import terminate_on_sigterm

    run = Run(Path(job.run_dir), ctx.rank, ctx.world_size, ctx)
    run.resolved = resolved
    run.policy = DevicePolicy.create(cfg.hardware, cfg.precision, ctx.device)
    _begin(run, job, cfg, resolved)
    run.attach_log()
    t0 = time.time()
    try:
        with terminate_on_sigterm():
            run.policy.apply(cfg.seed + 0)
            log.info(
                "%s run %s | rank %d/%d (%s) | device %s | dtype %s (%s)",
                job.stage,
                run.path,
                ctx.rank,
                ctx.world_size,
                ctx.info.launcher,
                ctx.device,
                run.policy.dtype_name,
                run.policy.dtype_reason,
            )
            result = body(cfg, run)
        if isinstance(result, dict):
            run.set_final_metrics(**result)
        run.set_final_metrics(wall_time_s=round(time.time() - t0, 3))
        run.finish("completed")
        return {"status": "completed", **run.final_metrics}
    except Preempted as e:
        run.finish(e.status, e, requeue=e.requeue is not None)
        raise
    except KeyboardInterrupt as e:
        run.finish("interrupted", "interrupted (Ctrl-C) before a checkpoint could be written")
        raise e
    except BaseException as e:
        log.error("run failed: %s: %s", type(e).__name__, e)
        run.finish("failed", e)
        raise
    finally:
        run.detach_log()
