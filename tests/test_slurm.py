"""Sweeps and jobs on a real Slurm cluster (launch/slurm/up.sh: slurmctld, two slurmd, slurmdbd).

Everything goes through the user's command line: `python -m chatlm.train ... cluster=slurm_cpu`
(conf/hydra/launcher/slurm_cpu.yaml -> chatlm's submitit launcher -> sbatch job arrays).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatlm.runtime.metrics import read_metrics
from tests.conftest import REPO, load_record, stage_env

SMOKE = ["debug=smoke", "eval_tokens=1024"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache with the smoke tokenizer already trained (jobs must not race to train it)."""
    root = tmp_path_factory.mktemp("slurm_cache")
    env = stage_env(root, CHATLM_CACHE_DIR=str(root / "cache"))
    p = subprocess.run(
        [sys.executable, "-m", "chatlm.train", *SMOKE, "steps=1"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "cache"


@pytest.fixture
def env(tmp_path, cache):
    return stage_env(tmp_path, CHATLM_CACHE_DIR=str(cache))


def chatlm(stage, *args, cwd, env, timeout=400):
    return subprocess.run(
        [sys.executable, "-m", f"chatlm.{stage}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(
        (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()), key=lambda p: int(p.name.split("_")[0])
    )


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def start_sweep_until_step(args: list[str], sweep: Path, step: int, *, cwd, env) -> subprocess.Popen:
    """Start `python -m chatlm.train ARGS` in the background; return once its first point logged `step`."""
    import time

    p = subprocess.Popen(
        [sys.executable, "-m", "chatlm.train", *args, f"hydra.sweep.dir={sweep}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        dirs = job_dirs(sweep) if sweep.is_dir() else []
        if dirs and (dirs[0] / "metrics.jsonl").exists() and len(losses(dirs[0])) >= step:
            return p
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.5)
    p.kill()
    raise AssertionError(f"the sweep in {sweep} did not reach step {step} within 180 s")


def summary_rows(sweep: Path) -> list[dict]:
    import csv

    return list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))


def test_three_point_sweep_is_one_job_array(slurm_cluster, tmp_path, env):
    sweep = tmp_path / "sweep"
    r = chatlm("train", *SMOKE, "cluster=slurm_cpu", "seed=1,2,3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    dirs = job_dirs(sweep)
    assert [d.name.split("_")[0] for d in dirs] == ["0", "1", "2"]
    records = [load_record(d) for d in dirs]
    assert [rec["status"] for rec in records] == ["completed"] * 3
    assert all(rec["launcher"] == "slurm" and rec["world_size"] == 1 for rec in records)
    assert len({rec["slurm"]["array_job_id"] for rec in records}) == 1  # one sbatch array
    assert sorted(rec["slurm"]["array_task_id"] for rec in records) == ["0", "1", "2"]
    finals = [rec["final_metrics"]["train_loss"] for rec in records]
    assert len(set(finals)) == 3  # three seeds, three different runs
    rows = summary_rows(sweep)
    assert [row["status"] for row in rows] == ["completed"] * 3
    assert [float(row["train_loss"]) for row in rows] == pytest.approx(finals, rel=1e-5)
    record = json.loads((sweep / "sweep.json").read_text())
    assert [j["num"] for j in record["jobs"]] == [0, 1, 2] and all(j["state"] == "finished" for j in record["jobs"])
    assert all(Path(j["stdout"]).is_file() for j in record["jobs"])  # the job logs are where sweep.json says


def test_two_task_job_is_two_gloo_ranks_in_one_directory(slurm_cluster, tmp_path, env):
    sweep = tmp_path / "sweep"
    args = [*SMOKE, "hardware=cpu2", "total_batch_size=1024"]
    r = chatlm("train", *args, "cluster=slurm_cpu", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    (d,) = job_dirs(sweep)
    rec = load_record(d)
    assert (rec["status"], rec["launcher"], rec["world_size"], rec["slurm"]["ntasks"]) == ("completed", "slurm", 2, "2")
    assert sorted(p.name for p in (d / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    # the same two ranks spawned locally by chatlm compute the same training run
    local = chatlm("train", *args, f"hydra.run.dir={tmp_path / 'local'}", cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert losses(d) == pytest.approx(losses(tmp_path / "local"), rel=1e-6, abs=1e-6)


def test_time_limit_requeues_and_resumes_to_the_same_loss(slurm_cluster, tmp_path, env):
    """A 1-minute job limit: Slurm sends USR2 ~20-50 s in, the loop checkpoints, submitit requeues
    the job, and it resumes in the same directory until done. The reference runs alongside."""
    args = [*SMOKE, "total_batch_size=4096", "steps=60"]
    reference = {}

    def run_reference():
        reference["p"] = chatlm("train", *args, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path, env=env)

    t = threading.Thread(target=run_reference)
    t.start()
    sweep = tmp_path / "sweep"
    r = chatlm(
        "train",
        *args,
        "cluster=slurm_cpu",
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=20",
        "hydra.launcher.max_num_timeout=6",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    t.join()
    assert r.returncode == 0, r.stderr[-4000:]
    assert reference["p"].returncode == 0, reference["p"].stderr[-3000:]
    (d,) = job_dirs(sweep)
    rec = load_record(d)
    attempts = rec["attempts"]
    assert rec["status"] == "completed" and len(attempts) >= 2, attempts
    assert all(a["status"] == "preempted" and a["requeued"] and "SIGUSR2" in a["reason"] for a in attempts[:-1])
    assert attempts[-1]["status"] == "completed"
    assert [a["slurm"].get("restart_count", "0") for a in attempts] == [str(i) for i in range(len(attempts))]
    assert len({a["slurm"]["job_id"] for a in attempts}) == 1  # requeued: the same Slurm job
    got, want = losses(d), losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 61))
    assert got == want  # bit-identical: resuming replays model, optimizer and data position exactly
    assert rec["final_metrics"]["train_loss"] == load_record(tmp_path / "ref")["final_metrics"]["train_loss"]


def test_failed_point_is_reported_and_retry_resubmits_only_it(slurm_cluster, tmp_path, env):
    warm = tmp_path / "warm"  # point 1 starts from this checkpoint, which does not exist yet
    sweep = tmp_path / "sweep"
    r = chatlm(
        "train",
        *SMOKE,
        "cluster=slurm_cpu",
        f"init_from=null,{warm}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 1 and "1 of 2 sweep jobs did not complete" in r.stderr, r.stderr[-3000:]
    rows = summary_rows(sweep)
    assert [row["status"] for row in rows] == ["completed", "failed"]
    assert "no checkpoint at" in rows[1]["error"]
    first = json.loads((sweep / "sweep.json").read_text())["jobs"]
    done_dir = job_dirs(sweep)[0]
    done_record = (done_dir / "run.json").read_text()

    shutil.copytree(done_dir, warm)  # fix the cause: the checkpoint now exists
    out = subprocess.run(
        [str(Path(sys.executable).parent / "chatlm"), "runs", "retry", str(sweep)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "#1 failed" in out.stdout and "#0" not in out.stdout.split("$")[0].split("points")[1]
    assert "hydra.launcher.only_jobs=[1]" in out.stdout
    after = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert after[0]["job_id"] == first[0]["job_id"]  # point 0 was not submitted again
    assert after[1]["job_id"] != first[1]["job_id"]
    assert (done_dir / "run.json").read_text() == done_record
    assert [row["status"] for row in summary_rows(sweep)] == ["completed", "completed"]
    retried = load_record(job_dirs(sweep)[1])
    assert len(retried["attempts"]) == 1 and retried["error"] is None  # a fresh start...
    (old,) = (sweep / ".retried").iterdir()  # ...and the failed attempt is kept aside
    assert load_record(old)["status"] == "failed"


@pytest.mark.parametrize("case", ["too_many_gpus", "missing_partition", "no_slurm"])
def test_bad_requests_are_refused_before_submission(slurm_cluster, tmp_path, env, case):
    args, extra_env = ["debug=smoke"], {}
    if case == "too_many_gpus":  # the test nodes have 2 (fake) GPUs each
        args += ["cluster=slurm_cpu", "hydra.launcher.gpus_per_node=8"]
        expect = "asks for 8 GPUs per node but the nodes of partition 'debug' have at most 2"
    elif case == "missing_partition":
        args += ["cluster=slurm_cpu"]
        extra_env = {"CHATLM_PARTITION": "gpu-big"}
        expect = "Slurm partition 'gpu-big' does not exist here; partitions: debug"
    else:
        args += ["cluster=slurm_cpu"]
        extra_env = {"PATH": str(Path(sys.executable).parent)}  # no sbatch on PATH
        expect = "Slurm is not installed here"
    before = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], capture_output=True, text=True).stdout.split()
    sweep = tmp_path / "sweep"
    r = chatlm("train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={**env, **extra_env}, timeout=120)
    assert r.returncode == 2 and expect in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not sweep.exists()  # refused before submitting: no sweep directory left behind
    after = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], capture_output=True, text=True).stdout.split()
    assert after == before  # nothing reached Slurm


def test_plain_sbatch_example_runs_two_ranks(slurm_cluster, tmp_path, env):
    """launch/slurm/train_h100.sbatch, shrunk to 2 CPU tasks on the test cluster's fake GPUs."""
    run_dir = tmp_path / "run"
    job_env = {**env, "RUN_DIR": str(run_dir), "CHATLM_HARDWARE": "cpu2", "CHATLM_PYTHON": sys.executable}
    r = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--ntasks-per-node=2",
            "--gpus-per-node=2",
            "--cpus-per-task=1",
            "--time=5",
            f"--output={tmp_path}/slurm-%j.out",
            str(REPO / "launch" / "slurm" / "train_h100.sbatch"),
            *SMOKE,
            "total_batch_size=1024",
        ],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert r.returncode == 0, r.stderr + log[-3000:]
    rec = load_record(run_dir)
    assert (rec["status"], rec["launcher"], rec["world_size"]) == ("completed", "slurm", 2)
    assert "[chatlm] job" in log and "requeueing" not in log


def test_cancelled_job_keeps_its_checkpoint_and_retry_resume_finishes_it(slurm_cluster, tmp_path, env):
    """scancel (SIGTERM to every task): the loop checkpoints and the point ends `preempted`; the
    sweep command exits 1; `chatlm runs retry --resume` continues it to the uninterrupted losses."""
    args = [*SMOKE, "total_batch_size=4096", "steps=20"]
    sweep = tmp_path / "sweep"
    p = start_sweep_until_step([*args, "cluster=slurm_cpu"], sweep, 3, cwd=tmp_path, env=env)
    job_id = json.loads((sweep / "sweep.json").read_text())["jobs"][0]["job_id"]
    subprocess.run(["scancel", job_id], check=True)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 1 and "did not complete" in err, err[-3000:]
    (d,) = job_dirs(sweep)
    rec = load_record(d)
    assert rec["status"] == "preempted" and "SIGTERM" in rec["error"]["message"]
    assert any((d / "checkpoints").glob("step_*"))

    reference = chatlm("train", *args, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path, env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    r = subprocess.run(
        [str(Path(sys.executable).parent / "chatlm"), "runs", "retry", "--resume", str(sweep)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "#0 preempted resume" in r.stdout
    rec = load_record(d)
    assert rec["status"] == "completed" and [a["status"] for a in rec["attempts"]] == ["preempted", "completed"]
    assert losses(d) == losses(tmp_path / "ref")
    assert not (sweep / ".retried").exists()


def test_show_names_the_job_its_logs_and_the_users_command(slurm_cluster, tmp_path, env):
    sweep = tmp_path / "sweep"
    r = chatlm("train", *SMOKE, "cluster=slurm_cpu", "steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (d,) = job_dirs(sweep)
    rec = load_record(d)
    assert rec["argv"][-5:] == [*SMOKE, "cluster=slurm_cpu", "steps=2", f"hydra.sweep.dir={sweep}"]
    assert rec["argv"][1:3] == ["-m", "chatlm.train"]  # what the user typed, not submitit's job command
    show = subprocess.run(
        [str(Path(sys.executable).parent / "chatlm"), "runs", "show", str(d)], env=env, capture_output=True, text=True
    )
    job = json.loads((sweep / "sweep.json").read_text())["jobs"][0]
    assert f"job          {job['job_id']} (slurm)" in show.stdout and job["stdout"] in show.stdout
    assert f"slurm job {rec['slurm']['job_id']} restart 0" in show.stdout


def test_submit_without_waiting_then_summarize(slurm_cluster, tmp_path, env):
    """hydra.launcher.wait=false: the command returns once the array is queued; the jobs finish on
    their own and `chatlm runs summarize` writes the summary afterwards."""
    import time

    sweep = tmp_path / "sweep"
    t0 = time.time()
    r = chatlm(
        "train",
        *SMOKE,
        "cluster=slurm_cpu",
        "hydra.launcher.wait=false",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not waiting" in r.stderr + r.stdout and "chatlm runs summarize" in r.stderr + r.stdout
    assert not (sweep / "summary.md").exists()  # nothing to summarize yet
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 2 and all(j["job_id"] for j in jobs)
    deadline = t0 + 240
    while time.time() < deadline:
        states = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", ",".join(j["job_id"] for j in jobs)],
            capture_output=True,
            text=True,
        ).stdout.split()
        if len(states) == 2 and all(s == "COMPLETED" for s in states):
            break
        time.sleep(1)
    s = subprocess.run(
        [str(Path(sys.executable).parent / "chatlm"), "runs", "summarize", str(sweep)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert s.returncode == 0, s.stderr
    assert [row["status"] for row in summary_rows(sweep)] == ["completed", "completed"]


def test_job_killed_outright_is_closed_as_failed_by_the_launcher(slurm_cluster, tmp_path, env):
    """SIGKILL (an OOM kill, a dead node): the job cannot close its own record; the launcher does,
    naming the job's log, and the sweep still ends with a summary."""
    sweep = tmp_path / "sweep"
    p = start_sweep_until_step(
        [*SMOKE, "total_batch_size=4096", "steps=40", "cluster=slurm_cpu"], sweep, 2, cwd=tmp_path, env=env
    )
    job = json.loads((sweep / "sweep.json").read_text())["jobs"][0]
    # kill -9 the rank process itself, as the kernel's OOM killer would (Slurm's own scancel sends SIGTERM first)
    killed = subprocess.run(["pkill", "-KILL", "-f", f"submitit.core._submit {sweep}"], capture_output=True)
    assert killed.returncode == 0
    out, err = p.communicate(timeout=240)
    assert p.returncode == 1 and "did not complete" in err, err[-3000:]
    (d,) = job_dirs(sweep)
    rec = load_record(d)
    assert rec["status"] == "failed" and f"Slurm job {job['job_id']} ended without a result" in rec["error"]["message"]
    assert job["stderr"] in rec["error"]["message"]
    assert [row["status"] for row in summary_rows(sweep)] == ["failed"]
    assert json.loads((sweep / "sweep.json").read_text())["jobs"][0]["state"] == "killed"


def test_eval_over_checkpoints_is_one_slurm_job_each(slurm_cluster, tmp_path, env):
    """`chatlm.eval -m ckpt=A,B cluster=slurm_cpu`: one array task per checkpoint, each result
    landing beside its checkpoint in the evaluated run (evals/step_<N>/)."""
    from tests.conftest import train_once

    run = train_once(tmp_path, env, *SMOKE, "save_every=2", "hardware=cpu")
    ckpts = ",".join(str(run / "checkpoints" / s) for s in ("step_000002", "step_000005"))
    bundle = Path(__file__).parent / "fixtures" / "evals" / "core"
    sweep = tmp_path / "eval_sweep"
    r = chatlm(
        "eval",
        "-m",
        f"ckpt={ckpts}",
        "eval=core",
        f"eval.core_bundle={bundle}",
        "eval.max_examples=3",
        "cluster=slurm_cpu",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = [load_record(j) for j in job_dirs(sweep)]
    assert len(records) == 2 and all(rec["status"] == "completed" and rec["launcher"] == "slurm" for rec in records)
    assert sorted(rec["slurm"]["array_task_id"] for rec in records) == ["0", "1"]  # one array, a task each
    copies = sorted((run / "evals").glob("step_*/*.json"))
    assert [c.parent.name for c in copies] == ["step_000002", "step_000005"]
    assert all("core_partial" in json.loads(c.read_text())["scores"] for c in copies)
