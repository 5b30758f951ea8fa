"""`chatlm runs sync --wandb` on the offline W&B run of a real tiny training run; no network is ever reached."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatlm.runs.sync import classify_failure, history_steps, offline_runs
from tests.conftest import run_dirs, stage_env

pytest.importorskip("wandb")

CLOSED_URL = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


def wandb_env(home: Path, **extra: str) -> dict[str, str]:
    """Offline W&B, its files under `home`, no key, no git/stats, and a base URL nobody answers."""
    env = stage_env(home)
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        env.pop(key, None)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_ERROR_REPORTING="false",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB_X_DISABLE_STATS="true",
        WANDB_CONFIG_DIR=str(home / "wb" / "config"),
        WANDB_CACHE_DIR=str(home / "wb" / "cache"),
        WANDB_DATA_DIR=str(home / "wb" / "data"),
        WANDB_ARTIFACT_DIR=str(home / "wb" / "artifacts"),
        NETRC=str(home / "wb" / "netrc"),
        WANDB_BASE_URL=CLOSED_URL,
    )
    env.update(extra)
    return env


def chatlm(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatlm.cli", "runs", "sync", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=env["CHATLM_OUTPUT_ROOT"].rsplit("/", 1)[0],
    )


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> tuple[Path, dict]:
    """A real 3-step tiny run with logger=wandb (offline)."""
    home = tmp_path_factory.mktemp("sync")
    env = wandb_env(home)
    r = subprocess.run(
        [sys.executable, "-m", "chatlm.train", "debug=smoke", "logger=wandb", "steps=3", "eval_tokens=1024"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = run_dirs(home / "outputs", "train")
    return run_dir, env


def test_dry_run_lists_the_offline_run_and_its_steps(wandb_run):
    run_dir, env = wandb_run
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (offline_dir,) = [p for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert offline_dir.name.endswith(run_id)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rows if '"loss"' in line]
    assert steps == [1, 2, 3]
    r = chatlm(env, "--wandb", "--dry-run", str(run_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "would sync 1 offline W&B run(s):"
    assert lines[1] == f"  {offline_dir} (run id {run_id}, 3 history rows, steps 1..3)"
    assert lines[2] == f"    wandb sync {offline_dir}"
    # the sweep/output root works too, and finds the same single directory
    r = chatlm(env, "--wandb", "--dry-run", env["CHATLM_OUTPUT_ROOT"])
    assert r.returncode == 0 and r.stdout.count("wandb sync ") == 1 and str(offline_dir) in r.stdout


def test_sync_without_network_says_so_in_one_line(wandb_run):
    run_dir, env = wandb_run
    r = chatlm(env, "--wandb", str(run_dir), "--timeout", "20")
    assert r.returncode == 0, r.stderr  # no network is not an error of the run: explained, nothing lost
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert err[0].startswith(f"chatlm runs sync: cannot reach {CLOSED_URL} (Connection refused); nothing uploaded.")
    assert f"chatlm runs sync --wandb {run_dir}" in err[0]
    assert r.stdout.startswith("not synced, 1 offline W&B run(s) stay in place:")
    assert not list(run_dir.glob("wandb/offline-run-*/*.synced"))


@pytest.fixture
def silent_server():
    """A local TCP port that accepts connections and never answers (a network that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    server.close()


def test_real_wandb_sync_no_key_and_hang_are_explained(wandb_run, silent_server):
    run_dir, env = wandb_run
    r = chatlm({**env, "WANDB_BASE_URL": silent_server}, "--wandb", str(run_dir), "--timeout", "30")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "no W&B API key: run `wandb login` or set WANDB_API_KEY" in r.stderr
    r = chatlm(
        {**env, "WANDB_BASE_URL": silent_server, "WANDB_API_KEY": "a" * 40}, "--wandb", str(run_dir), "--timeout", "4"
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "wandb sync did not finish within 4s" in err[0]


def test_running_synced_torn_and_foreign_dirs(wandb_run, tmp_path):
    run_dir, env = wandb_run
    root = tmp_path / "outputs"
    # a copy that is still running, with its .wandb log torn mid-record
    live = root / "train" / "live"
    shutil.copytree(run_dir, live, symlinks=True)
    record = json.loads((live / "run.json").read_text())
    (live / "run.json").write_text(json.dumps({**record, "status": "running", "end_time": None}))
    (log,) = live.glob("wandb/offline-run-*/run-*.wandb")
    log.write_bytes(log.read_bytes()[:-5])
    # a copy already synced, one without wandb, and another tool's directory
    synced = root / "train" / "synced"
    shutil.copytree(run_dir, synced, symlinks=True)
    (log_s,) = synced.glob("wandb/offline-run-*/run-*.wandb")
    log_s.with_name(log_s.name + ".synced").write_text("")
    plain = root / "train" / "plain"
    shutil.copytree(run_dir, plain, symlinks=True, ignore=shutil.ignore_patterns("wandb"))
    (root / "tool").mkdir()
    (root / "tool" / "metrics.jsonl").write_text("{}\n")
    r = chatlm({**env, "CHATLM_OUTPUT_ROOT": str(root)}, "--wandb", "--dry-run", str(root))
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert f"{live}: still running" in r.stderr
    assert "already synced" in r.stderr and f"{plain}: no offline W&B run" in r.stderr
    assert f"{root / 'tool'}: skipped (no run.json)" in r.stderr
    assert r.stdout == "nothing to sync\n"
    r = chatlm({**env, "CHATLM_OUTPUT_ROOT": str(root)}, "--wandb", "--dry-run", "--force", str(live))
    assert r.returncode == 0 and "would sync 1 offline W&B run(s):" in r.stdout
    (offline,) = offline_runs(live)
    assert offline.history_rows is not None and offline.history_rows <= 3  # the torn record is dropped
    log.write_bytes(b"not a wandb log")
    assert history_steps(log) is None and "history unreadable" in offline_runs(live)[0].describe()
    r = chatlm(env, "--dry-run", str(live))
    assert r.returncode == 2 and "--wandb" in r.stderr


def test_classify_failure():
    p = Path("x")
    assert classify_failure(p, 1, "Error: No API key configured. Use `wandb login`").blocked
    net = classify_failure(p, 1, "requests.exceptions.ConnectionError: Max retries exceeded")
    assert net.blocked and "network error" in net.message
    real = classify_failure(p, 2, "wandb: something\nError: bad run directory layout\n")
    assert not real.blocked and real.message == "wandb sync exited with 2: Error: bad run directory layout"


def test_without_the_wandb_package_it_says_how_to_sync_later(wandb_run, monkeypatch, capsys):
    from chatlm.cli import main
    from chatlm.runs import sync as S

    run_dir, _ = wandb_run
    monkeypatch.setattr(S, "wandb_installed", lambda: False)
    assert main(["runs", "sync", "--wandb", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("not synced, 1 offline W&B run(s) stay in place:") and "wandb sync " in out
    assert err.strip() == (
        f"chatlm runs sync: the wandb package is not installed (pip install 'chatlm[wandb]'); "
        f"nothing uploaded. Later: run `chatlm runs sync --wandb {run_dir}` again (or the "
        f"`wandb sync` commands above) where W&B can be reached"
    )
