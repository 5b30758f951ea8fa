"""`chatlm runs retry` on sweeps run in-process (Hydra's basic launcher); the Slurm side is in
tests/test_slurm.py."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import load_record, stage_env

SMOKE = ["debug=smoke", "eval_tokens=1024"]
CHATLM = str(Path(sys.executable).parent / "chatlm")


def statuses(sweep: Path) -> list[str]:
    return [row["status"] for row in csv.DictReader((sweep / "summary.csv").read_text().splitlines())]


def test_retry_of_an_in_process_sweep(tmp_path):
    env = stage_env(tmp_path)
    warm, sweep = tmp_path / "warm", tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "chatlm.train", "-m", *SMOKE, f"init_from=null,{warm}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert statuses(sweep) == ["completed", "failed"]
    first, second = sorted(p for p in sweep.iterdir() if p.name[:1].isdigit())

    dry = subprocess.run([CHATLM, "runs", "retry", str(sweep), "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "2 points (1 completed, 1 failed)" in dry.stdout, dry.stdout + dry.stderr
    assert (
        "hydra.run.dir=" in dry.stdout
        and second.name in dry.stdout
        and dry.stdout.split("$", 1)[1].split().count("-m") == 1
    )  # a single run, not a sweep
    assert second.is_dir()  # a dry run moves nothing

    shutil.copytree(first, warm)
    r = subprocess.run([CHATLM, "runs", "retry", str(sweep)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert statuses(sweep) == ["completed", "completed"]
    assert load_record(second)["status"] == "completed"
    assert [load_record(p)["status"] for p in (sweep / ".retried").iterdir()] == ["failed"]

    # a point whose directory is gone is "missing": --failed skips it, a plain retry re-creates it
    # under the directory name the sweep gave it
    record = load_record(first)
    shutil.rmtree(first)
    r = subprocess.run([CHATLM, "runs", "retry", str(sweep), "--failed"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to retry" in r.stdout, r.stdout
    r = subprocess.run([CHATLM, "runs", "retry", str(sweep)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    again = load_record(first)
    assert again["status"] == "completed"
    assert again["final_metrics"]["train_loss"] == record["final_metrics"]["train_loss"]  # same point, same result


def test_retry_refuses_what_is_not_a_sweep(tmp_path):
    r = subprocess.run([CHATLM, "runs", "retry", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a sweep directory" in r.stderr and "Traceback" not in r.stderr
