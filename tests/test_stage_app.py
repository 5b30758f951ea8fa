"""A stage app end to end as a user runs it: run directories, failures, resume rules, sweeps, errors."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import load_record, run_dirs, stage_env


def test_single_run_directory_contract(tmp_path, run_stage):
    r = run_stage("check", "matmul_size=32", "tags=[a,b]")
    assert r.returncode == 0, r.stderr
    (d,) = run_dirs(tmp_path / "outputs", "check")
    assert re.fullmatch(r"\d{2}-\d{2}-\d{2}-[0-9a-f]{4}_check", d.name) and re.fullmatch(
        r"\d{4}-\d{2}-\d{2}", d.parent.name
    )
    assert (tmp_path / "outputs" / "check" / "latest").resolve() == d.resolve()
    rec = load_record(d)
    assert rec["status"] == "completed" and rec["stage"] == "check" and rec["run_name"] == "check"
    assert rec["overrides"] == ["matmul_size=32", "tags=[a,b]"] and "chatlm.check" in " ".join(rec["argv"])
    assert rec["choices"]["hardware"] == "auto" and rec["world_size"] == 1 and rec["launcher"] == "single"
    assert rec["git"] is None or len(rec["git"]["sha"]) == 40
    assert rec["final_metrics"]["all_reduce"] == 1.0 and rec["duration_s"] >= 0
    resolved = (d / "config.resolved.yaml").read_text()
    assert "${" not in resolved
    cfg = yaml.safe_load(resolved)
    assert cfg["matmul_size"] == 32 and cfg["tags"] == ["a", "b"]
    assert cfg["paths"]["output_root"] == str(tmp_path / "outputs")
    assert cfg["derived"]["compute_dtype"] == "float32" and cfg["derived"]["world_size"] == 1
    assert "${" in (d / ".hydra" / "config.yaml").read_text()  # Hydra's own copy stays unresolved


def test_failed_run_exits_nonzero_and_records_failed(tmp_path, run_stage):
    r = run_stage("check", "fail=true")
    assert r.returncode != 0
    (d,) = run_dirs(tmp_path / "outputs", "check")
    rec = load_record(d)
    assert rec["status"] == "failed" and rec["error"]["type"] == "RuntimeError"
    assert rec["error"]["message"] == "check failed on purpose (fail=true)"
    assert "run failed: RuntimeError" in (d / "logs" / "rank0.log").read_text()


def test_sigterm_closes_the_record(tmp_path):
    env = stage_env(tmp_path)
    p = subprocess.Popen(
        [sys.executable, "-m", "chatlm.check", "sleep_s=60"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "outputs" / "check").glob("*/*/metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    rec = load_record(run_dirs(tmp_path / "outputs", "check")[0])
    assert rec["status"] == "failed" and rec["error"]["type"] == "Terminated" and rec["end_time"]


def test_resume_rules_for_an_explicit_run_dir(tmp_path, run_stage):
    target = tmp_path / "outputs" / "mine"
    first = run_stage("check", f"hydra.run.dir={target}", "resume=auto", "matmul_size=16")
    assert first.returncode == 0, first.stderr
    again = run_stage("check", f"hydra.run.dir={target}", "resume=auto", "matmul_size=16", "hardware=cpu")
    assert again.returncode == 0, again.stderr
    rec = load_record(target)
    assert len(rec["attempts"]) == 2 and rec["status"] == "completed"
    changed = run_stage("check", f"hydra.run.dir={target}", "resume=auto", "matmul_size=64")
    assert changed.returncode != 0
    assert "different config" in changed.stderr and "matmul_size: 16 -> 64" in changed.stderr
    never = run_stage("check", f"hydra.run.dir={target}", "resume=never", "matmul_size=16")
    assert never.returncode != 0 and "resume=never" in never.stderr
    assert len(load_record(target)["attempts"]) == 2


def test_multirun_writes_job_dirs_and_summary_and_fails_if_a_job_failed(tmp_path, run_stage):
    r = run_stage("check", "-m", "fail=false,true", "matmul_size=8")
    assert r.returncode == 1
    assert "1 of 2 sweep jobs did not complete: #1 failed" in r.stderr
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "check").glob("*/*")
    assert re.fullmatch(r"\d{2}-\d{2}-\d{2}-[0-9a-f]{4}", sweep.name)
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert names == ["0_fail=False,matmul_size=8", "1_fail=True,matmul_size=8"]
    csv = (sweep / "summary.csv").read_text().splitlines()
    assert csv[1].startswith("0,completed,fail=False matmul_size=8,1")
    assert csv[2].startswith("1,failed,fail=True matmul_size=8")
    assert load_record(sweep / names[1])["sweep"]["job_num"] == 1
    assert not (tmp_path / "outputs" / "check" / "latest").exists()


def test_bad_input_gets_one_clear_message(tmp_path, run_stage):
    r = run_stage("check", "hardware.nproc_per_nod=2")
    assert r.returncode == 2 and "Did you mean 'hardware.nproc_per_node'?" in r.stderr and "Traceback" not in r.stderr
    r = run_stage("check", "matmul_size=abc")  # a wrong type: one line naming the key, before Hydra runs
    assert r.returncode == 2 and r.stderr.strip() == "chatlm check: error: matmul_size: must be int, got 'abc'"
    r = run_stage("check", "hardware=h100x9")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Could not find 'hardware/h100x9'" in out and "cpu2" in out and "Traceback" not in out
    r = run_stage("check", "hardware.nproc_per_node=0")
    assert r.returncode == 2 and "hardware.nproc_per_node: must be >= 1, got 0" in r.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was created for refused input


def test_cfg_job_resolve_prints_the_composed_config(tmp_path, run_stage):
    r = run_stage("check", "--cfg", "job", "--resolve", "matmul_size=7")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["matmul_size"] == 7 and cfg["hardware"]["name"] == "auto" and "${" not in r.stdout
    assert not (tmp_path / "outputs").exists()


def test_invalid_sweep_point_is_a_failed_job_not_a_crash(tmp_path, run_stage):
    r = run_stage("check", "-m", "matmul_iters=1,0", "hardware.nproc_per_node=1,0")
    assert r.returncode == 1 and "2 of 4 sweep jobs did not complete" in r.stderr
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "check").glob("*/*")
    rows = (sweep / "summary.csv").read_text().splitlines()[1:]
    failed = sorted(row.split(",")[2] for row in rows if row.split(",")[1] == "failed")
    assert len(failed) == 2 and all("hardware.nproc_per_node=0" in f for f in failed)
    # hardware keys do not change results, so job directories are named without them: find the job by number
    num = next(row.split(",")[0] for row in rows if row.split(",")[1] == "failed")
    bad = load_record(next(sweep.glob(f"{num}_*")))
    assert bad["error"]["type"] == "ConfigError" and "hardware.nproc_per_node" in bad["error"]["message"]


def test_failure_on_spawned_ranks_is_recorded(tmp_path, run_stage):
    r = run_stage("check", "hardware=cpu2", "fail=true")
    assert r.returncode != 0
    rec = load_record(run_dirs(tmp_path / "outputs", "check")[0])
    assert rec["status"] == "failed" and rec["world_size"] == 2 and "on purpose" in rec["error"]["message"]


def test_a_user_error_on_spawned_ranks_is_one_line(tmp_path, run_stage):
    # every rank raises CheckpointError; it reaches the launching process as data, not traceback text
    r = run_stage(
        "train", "debug=smoke", "hardware=cpu2", "total_batch_size=1024", "init_from=/no/such/ckpt", timeout=300
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "chatlm train: error: no checkpoint at /no/such/ckpt: the path does not exist" in r.stderr
    assert "Traceback" not in r.stderr and "run directory:" in r.stderr
    rec = load_record(run_dirs(tmp_path / "outputs", "train")[0])
    assert rec["status"] == "failed" and rec["error"]["type"] == "CheckpointError"
