"""What a new user hit on a fresh CPU machine (issue [U]), each as a stage app run as a subprocess:
the exit code, the one line it prints, and what it leaves behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import SMOKE, load_record, losses, run_dirs


@pytest.mark.parametrize("args, preset", [(["hardware=h100x1"], "h100x1"), (["experiment=speedrun"], "h100x8")])
def test_a_gpu_preset_on_a_cpu_machine_is_one_line(tmp_path, run_stage, env, args, preset):
    r = run_stage("train", *args, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"config error: hardware.device: hardware={preset} sets hardware.device=cuda" in r.stderr
    assert "use hardware=auto or hardware=cpu" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()  # no run directory holding only .hydra/


def test_core_in_training_without_its_data_stops_before_the_first_step(tmp_path, run_stage, env):
    r = run_stage("train", *SMOKE, "core_metric_every=5", f"core_bundle={tmp_path / 'none'}", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "no CORE tasks at" in r.stderr and "chatlm fetch evals" in r.stderr and "point core_bundle" in r.stderr
    (d,) = run_dirs(tmp_path / "outputs", "train")
    assert not (d / "checkpoints").exists() and load_record(d)["status"] == "failed"


@pytest.mark.parametrize(
    "override, text",
    [
        ("optim.matrix_lr=-0.02", "optim.matrix_lr: must be in (0, inf), got -0.02"),
        ("optim.embedding_lr=-1", "optim.embedding_lr: must be in (0, inf), got -1.0"),
        ("optim.scalar_lr=0", "optim.scalar_lr: must be in (0, inf), got 0.0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: must be in [0, inf), got -0.1"),
        ("optim.adam_eps=0", "optim.adam_eps: must be in (0, 1], got 0.0"),
        ("optim.momentum=1.0", "optim.momentum: must be in [0, 1), got 1.0"),
        ("optim.wte_betas=[0.9,1.0]", "optim.wte_betas: must be two numbers in [0, 1)"),
        ("schedule.final_lr_frac=2", "schedule.final_lr_frac: must be in [0, 1], got 2.0"),
        ("core_metric_every=0", "core_metric_every: must be -1 (off) or >= 1, got 0"),
    ],
)
def test_values_out_of_range_are_refused_at_composition(tmp_path, run_stage, env, override, text):
    r = run_stage("train", *SMOKE, override, env=env)
    assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


def test_ctrl_c_checkpoints_records_interrupted_and_resumes_exactly(tmp_path, run_stage, env):
    args = [*SMOKE, "steps=40"]
    ref = run_stage("train", *args, f"hydra.run.dir={tmp_path}/ref", env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cut = tmp_path / "cut"
    p = subprocess.Popen(
        [sys.executable, "-m", "chatlm.train", *args, f"hydra.run.dir={cut}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and max(losses(cut) or {0: 0}) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    rec = load_record(cut)
    step = max(losses(cut))
    assert rec["status"] == "interrupted" and 3 <= step < 40
    assert (
        f"interrupted: Ctrl-C: stopped after step {step} with a checkpoint; continue with: python -m "
        f"chatlm.train debug=smoke eval_tokens=1024 steps=40 hydra.run.dir={cut}" in err
    )
    assert (cut / "checkpoints" / "latest").resolve().name == f"step_{step:06d}"
    again = run_stage("train", *args, f"hydra.run.dir={cut}", env=env)  # the printed command
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(cut) == losses(tmp_path / "ref")  # bitwise on CPU
    assert [a["status"] for a in load_record(cut)["attempts"]] == ["interrupted", "completed"]


def test_a_cpu_run_of_a_big_model_says_how_long_it_would_take(tmp_path, run_stage, env):
    r = run_stage("train", "--plan", "model=d24", "hardware=cpu", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1,384,122,122 params" in r.stdout and "8,352 steps" in r.stdout  # nanochat's d24 at ratio 12
    assert "memory about" in r.stdout and "warning: this run would take about" in r.stdout and "days" in r.stdout
    assert not (tmp_path / "outputs").exists()  # --plan runs nothing


def test_the_end_of_a_run_says_what_it_did_and_what_next(tmp_path, run_stage, env):
    r = run_stage("train", *SMOKE, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (d,) = run_dirs(tmp_path / "outputs", "train")
    out = r.stdout + r.stderr
    assert "done: 5 steps, 2,560 tokens in" in out and "val bpb" in out and f"run directory: {d}" in out
    assert f"python -m chatlm.eval ckpt={d}" in out and f"chatlm runs plot {d}" in out
    assert "estimate on cpu" in out  # said before the first step
    assert "nanobind" not in out and "Progress: " not in out  # no shutdown leak report, no 1 %-lines
    failed = run_stage("train", *SMOKE, "init_from=/no/such", env=env)
    assert failed.returncode == 1
    assert (tmp_path / "outputs" / "train" / "latest").resolve() == d.resolve()  # the newest completed run


def test_help_is_the_stages_own(run_stage, env):
    r = run_stage("train", "--help", env=env)
    assert r.returncode == 0 and "schema/" not in r.stdout
    assert "pretrain a base model" in r.stdout and "groups (pick one option each):" in r.stdout
    assert "model        default d20" in r.stdout and "d4, d6, d8" in r.stdout
    assert "eval_every" in r.stdout and "examples:" in r.stdout and "--plan" in r.stdout


def test_sweep_points_that_coincide_are_named(tmp_path, run_stage, env):
    # the tiny model has 2 layers: SL and SSSL give the same windows (32, 128)
    r = run_stage("train", *SMOKE, "sweep=window", env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "sweep points #1 (model.window_pattern=SL" in out and "#2 (model.window_pattern=SSSL" in out
    assert "are the same run" in out and "#0 (model.window_pattern=L" not in out


def test_a_smoke_sweep_over_softcap_shows_a_difference(tmp_path, run_stage, env):
    r = run_stage("train", "-m", *SMOKE, "model.softcap=10,20", env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "train").glob("*/*")
    bpbs = [
        json.loads((job / "run.json").read_text())["final_metrics"]["val_bpb"]
        for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    ]
    assert len(bpbs) == 2 and abs(bpbs[0] - bpbs[1]) > 0.01
