"""Rank setup for every launch: environment parsing, and real 2-rank gloo runs of chatlm.check
(spawned by chatlm, under torchrun, from a Slurm task environment, through submitit) that must
agree on one run directory whose record is written once."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch.distributed as tdist

from chatlm.runtime import dist
from tests.conftest import load_record, run_dirs, stage_env


def test_detect_single():
    assert dist.detect({}) == dist.RankInfo()


def test_detect_torchrun():
    env = {
        "TORCHELASTIC_RUN_ID": "abc",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "29400",
    }
    info = dist.detect(env)
    assert (info.launcher, info.rank, info.local_rank, info.world_size, info.local_world_size, info.node_rank) == (
        "torchrun",
        3,
        1,
        4,
        2,
        1,
    )
    assert (info.master_addr, info.master_port, info.job_id) == ("h0", 29400, "abc")


def test_detect_slurm_derives_master_and_ranks():
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
    }
    info = dist.detect(env)
    assert (info.launcher, info.rank, info.local_rank, info.world_size, info.local_world_size, info.node_rank) == (
        "slurm",
        5,
        1,
        8,
        2,
        2,
    )
    assert info.master_addr == "gpu07" and info.master_port == dist.port_from_job_id("12340")
    assert 20000 <= info.master_port < 60000


def test_slurm_batch_script_is_not_a_rank():
    # inside the sbatch script itself (no srun step) there is one process, whatever SLURM_NTASKS says
    env = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1"}
    assert dist.detect(env).launcher == "single"


def test_detect_submitit_local_and_plain_env():
    info = dist.detect(
        {
            "SUBMITIT_LOCAL_GLOBALID": "1",
            "SUBMITIT_LOCAL_LOCALID": "1",
            "SUBMITIT_LOCAL_NTASKS": "2",
            "SUBMITIT_LOCAL_JOB_ID": "777",
        }
    )
    assert (info.launcher, info.rank, info.world_size, info.master_port) == (
        "submitit_local",
        1,
        2,
        dist.port_from_job_id("777"),
    )
    info = dist.detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (info.launcher, info.rank, info.master_addr, info.master_port) == ("env", 1, "10.0.0.1", 1234)


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[07-09,12],cpu5", ["gpu07", "gpu08", "gpu09", "gpu12", "cpu5"]),
        ("a[1,3]-ib", ["a1-ib", "a3-ib"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert dist.expand_nodelist(nodelist) == hosts


def _sum_ranks(ctx: dist.DistContext, offset: float) -> dict:
    import torch

    t = torch.tensor([ctx.rank + offset])
    tdist.all_reduce(t)
    return {
        "rank": ctx.rank,
        "sum": t.item(),
        "world": ctx.world_size,
        "backend": ctx.backend,
        "same": ctx.broadcast_object(f"from-{ctx.rank}"),
    }


def test_launch_spawns_gloo_ranks_and_returns_rank0():
    out = dist.launch(_sum_ranks, (10.0,), info=dist.RankInfo(), nproc_per_node=2, device="cpu")
    assert out == {"rank": 0, "sum": 21.0, "world": 2, "backend": "gloo", "same": "from-0"}


def test_launch_single_process_has_no_process_group():
    seen = dist.launch(
        lambda ctx: (ctx.world_size, ctx.distributed, ctx.all_gather_object(5)), (), info=dist.RankInfo(), device="cpu"
    )
    assert seen == (1, False, [5])


# ---- the real app, two ranks, four launch paths --------------------------------------------------


def assert_one_two_rank_run(tmp_path, launcher: str, root=None) -> None:
    root = root or tmp_path / "outputs"
    dirs = run_dirs(root, "check")
    assert len(dirs) == 1, f"expected one run directory, got {dirs}"
    rec = load_record(dirs[0])
    assert rec["status"] == "completed" and rec["launcher"] == launcher and rec["world_size"] == 2
    assert len(rec["attempts"]) == 1, "run.json was begun by more than one rank"
    assert rec["final_metrics"]["all_reduce"] == 3.0 and rec["final_metrics"]["ranks_agree_on_run_dir"] is True
    assert sorted(p.name for p in (dirs[0] / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert "rank 1/2" in (dirs[0] / "logs" / "rank1.log").read_text()
    assert (dirs[0] / "config.resolved.yaml").is_file() and (dirs[0] / ".hydra" / "config.yaml").is_file()
    assert [line.count('"all_reduce"') for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()] == [1]


def test_check_spawned_ranks(tmp_path, run_stage):
    r = run_stage("check", "hardware=cpu2")
    assert r.returncode == 0, r.stderr
    assert_one_two_rank_run(tmp_path, "spawn")


def test_check_under_torchrun(tmp_path, run_stage):
    r = run_stage(
        "check",
        "hardware=cpu",
        prefix=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"],
    )
    assert r.returncode == 0, r.stderr
    assert_one_two_rank_run(tmp_path, "torchrun")


def test_check_from_slurm_task_environment(tmp_path):
    """What `srun --ntasks=2 python -m chatlm.check` gives each task (no MASTER_*/RANK: derived)."""
    job = str(random.randint(100000, 999999))
    procs = []
    for rank in (0, 1):
        env = stage_env(
            tmp_path,
            SLURM_JOB_ID=job,
            SLURM_STEP_ID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NODEID="0",
            SLURM_NTASKS="2",
            SLURM_JOB_NUM_NODES="1",
            SLURM_JOB_NODELIST="localhost",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "chatlm.check", "hardware=cpu"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_one_two_rank_run(tmp_path, "slurm")
    rec = load_record(run_dirs(tmp_path / "outputs", "check")[0])
    assert rec["slurm"]["job_id"] == job and rec["slurm"]["ntasks"] == "2"


def test_check_through_submitit_local_tasks(tmp_path, run_stage):
    r = run_stage("check", "cluster=submitit_local", "hardware=cpu2")
    assert r.returncode == 0, r.stdout + r.stderr
    sweeps = list((tmp_path / "outputs" / "sweeps" / "check").glob("*/*"))
    assert len(sweeps) == 1
    job_dirs = [p for p in sweeps[0].iterdir() if p.name.startswith("0_")]
    # hardware does not change results, so it is left out of the job directory's name
    assert [p.name for p in job_dirs] == ["0_default"]
    rec = load_record(job_dirs[0])
    assert rec["launcher"] == "submitit_local" and rec["world_size"] == 2 and len(rec["attempts"]) == 1
    assert rec["final_metrics"]["all_reduce"] == 3.0
    assert "| 0 | completed |" in (sweeps[0] / "summary.md").read_text()


def test_one_task_slurm_step_is_recorded_as_slurm():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "n1",
    }
    info = dist.detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_world_size, info.job_id) == ("slurm", 0, 1, 1, "7")
