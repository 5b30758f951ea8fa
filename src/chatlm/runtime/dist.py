"""Rank setup: one code path for every way chatlm is launched.

| launch                                   | who starts the ranks          | `detect().launcher` |
|------------------------------------------|-------------------------------|---------------------|
| `python -m chatlm.X`                     | nobody: one process           | single              |
| `python -m chatlm.X hardware.nproc_per_node=8` | `launch` spawns them after Hydra composed once | spawn |
| `torchrun --nproc_per_node=8 -m chatlm.X` | torchrun (RANK, WORLD_SIZE, ...) | torchrun          |
| `srun` / submitit on Slurm               | Slurm (SLURM_PROCID, ...)     | slurm               |
| submitit's local executor                | submitit (SUBMITIT_LOCAL_*)   | submitit_local      |
| anything exporting RANK/WORLD_SIZE/MASTER_* | it                          | env                 |

`launch(fn, args, ...)` initialises torch.distributed (NCCL on CUDA, gloo on CPU) where there is
more than one rank and calls `fn(ctx, *args)` once per rank with a `DistContext`. Slurm does not
export MASTER_ADDR/PORT/RANK/WORLD_SIZE, so they are derived here from SLURM_* variables (first host
of the node list; a port derived from the job id, so every task computes the same one).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as tdist

from chatlm.errors import ChatlmError, ConfigError, RankFailure
from chatlm.runtime import stamp as stamp_mod

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    launcher: str = "single"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    job_id: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------
# detection


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list: 'n[1-3,7],gpu05' -> ['n1', 'n2', 'n3', 'n7', 'gpu05']."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def port_from_job_id(job_id: str) -> int:
    """A port in [20000, 60000) that every task of one job computes identically."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 40000


def detect(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read this process's rank layout from the environment (see the module table)."""
    env = os.environ if env is None else env

    def num(key: str, default: int = 0) -> int:
        value = env.get(key, "")
        return int(value) if value.strip() else default

    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        world = num("WORLD_SIZE", 1)
        return RankInfo(
            "torchrun",
            num("RANK"),
            num("LOCAL_RANK"),
            world,
            num("LOCAL_WORLD_SIZE", world),
            num("GROUP_RANK"),
            env.get("MASTER_ADDR"),
            num("MASTER_PORT") or None,
            env.get("TORCHELASTIC_RUN_ID"),
        )
    if "SUBMITIT_LOCAL_GLOBALID" in env and num("SUBMITIT_LOCAL_NTASKS", 1) > 1:
        job = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        world = num("SUBMITIT_LOCAL_NTASKS", 1)
        return RankInfo(
            "submitit_local",
            num("SUBMITIT_LOCAL_GLOBALID"),
            num("SUBMITIT_LOCAL_LOCALID"),
            world,
            world,
            0,
            "127.0.0.1",
            num("MASTER_PORT") or port_from_job_id(job),
            job,
        )
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if "SLURM_PROCID" in env and in_step:  # (one task too: the record should say it ran on Slurm)
        world = num("SLURM_NTASKS", 1)
        nodes = max(1, num("SLURM_JOB_NUM_NODES", 1) or num("SLURM_NNODES", 1))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = env.get("SLURM_JOB_ID", "0")
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0"))
        master = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        port = num("MASTER_PORT") or port_from_job_id(f"{job}{step}")
        return RankInfo(
            "slurm",
            num("SLURM_PROCID"),
            num("SLURM_LOCALID"),
            world,
            max(1, world // nodes),
            num("SLURM_NODEID"),
            master,
            port,
            job,
        )
    if num("WORLD_SIZE", 1) > 1 and "RANK" in env:
        world = num("WORLD_SIZE", 1)
        return RankInfo(
            "env",
            num("RANK"),
            num("LOCAL_RANK"),
            world,
            num("LOCAL_WORLD_SIZE", world),
            0,
            env.get("MASTER_ADDR", "127.0.0.1"),
            num("MASTER_PORT", 29500),
            None,
        )
    return RankInfo()


# ----------------------------------------------------------------------------------------------
# the per-rank context


@dataclass
class DistContext:
    """What a rank knows about the job: its rank, its device, and whether a process group exists."""

    info: RankInfo
    device: torch.device
    backend: Optional[str] = None

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def local_rank(self) -> int:
        return self.info.local_rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and tdist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                tdist.barrier(device_ids=[self.device.index or 0])
            else:
                tdist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """rank `src`'s Python object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed:
            tdist.destroy_process_group()
        self.backend = None


def resolve_device_type(requested: str, preset: Optional[str] = None) -> str:
    """'auto' -> 'cuda' if a GPU is visible, else 'mps' on Apple silicon, else 'cpu'. A device this
    machine does not have is a ConfigError naming the hardware preset and what fits here."""
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            fits = "hardware=auto or hardware=cpu"
            asked = f"hardware={preset} sets hardware.device=cuda" if preset else "hardware.device=cuda"
            raise ConfigError(
                "hardware.device",
                f"{asked}, but torch {torch.__version__} sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); on this machine "
                f"use {fits}",
            )
        if requested == "mps" and not _mps_available():
            raise ConfigError(
                "hardware.device",
                "hardware.device=mps, but this machine has no Apple MPS device; use hardware=auto or hardware=cpu",
            )
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def rank_device(device_type: str, info: RankInfo) -> torch.device:
    if device_type == "cuda":
        count = torch.cuda.device_count()
        index = info.local_rank if info.local_world_size <= count else info.local_rank % max(count, 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device_type)


def init(info: RankInfo, device_type: str, store: Any = None, timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """This rank's DistContext; creates the process group when world_size > 1."""
    device = rank_device(device_type, info)
    if info.world_size == 1:
        return DistContext(info, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Libraries (and our own later code) read these; Slurm does not set them.
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
    )
    if info.master_addr:
        os.environ["MASTER_ADDR"] = info.master_addr
    if info.master_port:
        os.environ["MASTER_PORT"] = str(info.master_port)
    kwargs: dict[str, Any] = dict(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    if backend == "nccl":
        kwargs["device_id"] = device
    if store is not None:
        kwargs["store"] = store
    elif info.launcher in ("slurm", "submitit_local"):
        kwargs["store"] = _tcp_store(info, timeout)
    else:
        kwargs["init_method"] = "env://"
    tdist.init_process_group(**kwargs)
    return DistContext(info, device, backend)


def _tcp_store(info: RankInfo, timeout: timedelta) -> Any:
    return tdist.TCPStore(
        info.master_addr or "127.0.0.1",
        int(info.master_port or 29500),
        info.world_size,
        is_master=info.rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )


def agree_on_stamp(info: RankInfo, timeout: timedelta = timedelta(minutes=5)) -> tuple[dict, Any]:
    """Make every rank of an external launch use rank 0's run-directory stamp.

    Under torchrun the workers reach the agent's store at MASTER_ADDR:MASTER_PORT; elsewhere rank 0
    hosts a TCPStore there, which is returned so the process group can reuse it (one port).
    """
    run_key = f"chatlm/stamp/{info.job_id or 'job'}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    keep = None
    if info.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        assert info.master_addr is not None and info.master_port is not None  # torchrun exports both
        store = tdist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout)
    else:
        store = keep = _tcp_store(info, timeout)
    if info.rank == 0:
        value = stamp_mod.current()
        store.set(run_key, "|".join([value["date"], value["time"], value["suffix"]]))
    else:
        date, time_, suffix = store.get(run_key).decode().split("|")
        value = {"date": date, "time": time_, "suffix": suffix}
    return value, keep


# ----------------------------------------------------------------------------------------------
# launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    args: tuple,
    *,
    info: RankInfo | None = None,
    nproc_per_node: int = 1,
    store: Any = None,
    device: str = "auto",
) -> Any:
    """Call `fn(ctx, *args)` on every rank and return rank 0's result.

    If this process is already one rank of a launched job, that is the only rank run here;
    otherwise `nproc_per_node > 1` spawns that many local ranks (the caller composed its config once).
    """
    info = detect() if info is None else info
    device_type = resolve_device_type(device)
    if info.world_size > 1:
        ctx = init(info, device_type, store)
        try:
            out = fn(ctx, *args)
            ctx.barrier()  # leave together: tearing gloo down while a peer still talks can abort
            return out
        finally:
            ctx.close()
    if nproc_per_node > 1:
        return _spawn(fn, args, nproc_per_node, device_type)
    return fn(DistContext(info, rank_device(device_type, info), None), *args)


def _spawn(fn: Callable[..., Any], args: tuple, nproc: int, device_type: str) -> Any:
    """Spawn `nproc` local ranks; rank 0's result comes back through a queue, and so does the first
    ChatlmError any rank raised (as a `RankFailure`), re-raised here with its message and exit code."""
    import torch.multiprocessing as mp

    if device_type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(
            "hardware.nproc_per_node", f"is {nproc} but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    base = RankInfo("spawn", 0, 0, nproc, nproc, 0, "127.0.0.1", free_port(), f"spawn{os.getpid()}")
    try:
        mp.start_processes(
            _spawned_rank,
            args=(fn, args, base, device_type, results, stamp_mod.current()),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        failures = [item for item in _drain(results) if isinstance(item, RankFailure)]
        if failures:
            raise min(failures, key=lambda f: f.rank).as_error() from None
        raise
    outputs = [item for item in _drain(results) if not isinstance(item, RankFailure)]
    return outputs[0] if outputs else None


def _drain(queue: Any) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _spawned_rank(
    local_rank: int, fn: Callable[..., Any], args: tuple, base: RankInfo, device_type: str, results: Any, stamp: dict
) -> None:
    stamp_mod.set_current(stamp)
    info = replace(base, rank=local_rank, local_rank=local_rank)
    ctx = init(info, device_type)
    try:
        out = fn(ctx, *args)
        if ctx.is_main:
            results.put(out)
        ctx.barrier()  # leave together (see launch)
    except ChatlmError as e:
        results.put(RankFailure.of(local_rank, e))
        raise
    finally:
        ctx.close()
