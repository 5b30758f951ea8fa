"""The run-directory contract: records, hashing, refusal to reuse, metrics, summaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from chatlm.runs.summary import write_summary
from chatlm.runtime.metrics import MetricsWriter, read_metrics
from chatlm.runtime.rundir import (
    JobInfo,
    Run,
    RunDirError,
    atomic_write_text,
    config_diff,
    config_hash,
    mark_failed_if_running,
    update_latest_link,
)

CFG = {
    "stage": "train",
    "run_name": "r",
    "seed": 1,
    "resume": "auto",
    "model": {"depth": 4, "softcap": 15.0},
    "paths": {"output_root": "/x"},
    "hardware": {"nproc_per_node": 1},
}


def job(tmp_path: Path, name: str = "run", multirun: bool = False) -> JobInfo:
    return JobInfo(
        stage="train",
        run_dir=str(tmp_path / name),
        output_root=str(tmp_path),
        multirun=multirun,
        overrides=["model.depth=4"],
        choices={"model": "d4"},
        argv=["python", "-m", "chatlm.train"],
    )


def test_begin_writes_record_config_and_latest(tmp_path):
    run = Run(tmp_path / "run")
    run.begin(job(tmp_path), CFG, derived={"n_embd": 256}, world_size=2, launcher="spawn")
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "running" and rec["stage"] == "train" and rec["world_size"] == 2
    assert rec["config_hash"] == config_hash(CFG) and rec["overrides"] == ["model.depth=4"]
    assert rec["choices"] == {"model": "d4"} and rec["launcher"] == "spawn"
    assert rec["versions"]["torch"] and rec["versions"]["python"]
    assert len(rec["attempts"]) == 1 and rec["attempts"][0]["status"] == "running"
    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    assert resolved["model"] == {"depth": 4, "softcap": 15.0} and resolved["derived"] == {"n_embd": 256}
    latest = tmp_path / "train" / "latest"
    assert not latest.exists()  # <stage>/latest follows completed runs only
    run.finish("completed")
    assert latest.is_symlink() and latest.resolve() == (tmp_path / "run").resolve()
    assert not os.path.isabs(os.readlink(latest))


def test_latest_skips_failed_runs(tmp_path):
    good = Run(tmp_path / "good")
    good.begin(job(tmp_path), CFG)
    good.finish("completed")
    bad = Run(tmp_path / "bad")
    bad.begin(job(tmp_path), CFG)
    bad.finish("failed", RuntimeError("boom"))
    assert (tmp_path / "train" / "latest").resolve() == (tmp_path / "good").resolve()


def test_finish_records_metrics_and_duration(tmp_path):
    run = Run(tmp_path / "run")
    run.begin(job(tmp_path), CFG)
    run.log_metrics(step=1, loss=2.5)
    run.log_metrics(step=2, loss=float("nan"))
    run.set_final_metrics(val_bpb=0.91)
    run.record_derived(horizon=100)
    run.finish("completed")
    rec = run.record()
    assert rec["status"] == "completed" and rec["final_metrics"] == {"val_bpb": 0.91}
    assert rec["duration_s"] is not None and rec["duration_s"] >= 0 and rec["end_time"]
    assert rec["attempts"][-1]["status"] == "completed"
    rows = list(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 2.5 and rows[1]["loss"] == "nan"
    assert yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())["derived"] == {"horizon": 100}


def test_failed_run_records_the_exception(tmp_path):
    run = Run(tmp_path / "run")
    run.begin(job(tmp_path), CFG)
    try:
        raise ValueError("loss is nan at step 7")
    except ValueError as e:
        run.finish("failed", e)
    rec = run.record()
    assert rec["status"] == "failed"
    assert rec["error"]["type"] == "ValueError" and rec["error"]["message"] == "loss is nan at step 7"
    assert "raise ValueError" in rec["error"]["traceback"]


def test_resume_same_config_appends_an_attempt(tmp_path):
    Run(tmp_path / "run").begin(job(tmp_path), CFG)
    Run(tmp_path / "run").finish("preempted")
    # a requeued job may run on other hardware or write elsewhere: those keys are not hashed
    moved = {**CFG, "hardware": {"nproc_per_node": 8}, "paths": {"output_root": "/y"}, "resume": "auto"}
    run = Run(tmp_path / "run")
    run.begin(job(tmp_path), moved)
    rec = run.record()
    assert run.resumed and rec["status"] == "running" and len(rec["attempts"]) == 2
    assert rec["attempts"][0]["status"] == "preempted"


def test_resume_with_a_different_config_is_refused_with_the_diff(tmp_path):
    Run(tmp_path / "run").begin(job(tmp_path), CFG)
    changed = {**CFG, "model": {"depth": 4, "softcap": 20.0}, "seed": 2}
    with pytest.raises(RunDirError) as e:
        Run(tmp_path / "run").begin(job(tmp_path), changed)
    assert "model.softcap: 15.0 -> 20.0" in str(e.value) and "seed: 1 -> 2" in str(e.value)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config_hash"] == config_hash(CFG)


def test_resume_never_refuses_an_existing_run(tmp_path):
    Run(tmp_path / "run").begin(job(tmp_path), CFG)
    with pytest.raises(RunDirError, match="resume=never"):
        Run(tmp_path / "run").begin(job(tmp_path), CFG, resume="never")


def test_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        Run(tmp_path / "run").begin(job(tmp_path), CFG)
    # Hydra's own .hydra/ alone is fine
    (tmp_path / "run" / "notes.txt").unlink()
    Run(tmp_path / "run").begin(job(tmp_path), CFG)


def test_config_hash_and_diff():
    assert config_hash(CFG) == config_hash(json.loads(json.dumps(CFG)))
    assert config_hash(CFG) != config_hash({**CFG, "seed": 2})
    assert config_hash(CFG) == config_hash({**CFG, "resume": "never", "logger": {"kind": "wandb"}, "tags": ["a"]})
    assert config_diff(CFG, {**CFG, "model": {"depth": 6, "softcap": 15.0}}) == ["model.depth: 4 -> 6"]


def test_sweep_jobs_do_not_move_latest(tmp_path):
    info = job(tmp_path, multirun=True)
    info.sweep_dir, info.job_num, info.override_dirname = str(tmp_path), 3, "model.depth=4"
    Run(tmp_path / "run").begin(info, CFG)
    assert not (tmp_path / "train" / "latest").exists()
    assert Run(tmp_path / "run").record()["sweep"] == {
        "dir": str(tmp_path),
        "job_num": 3,
        "override_dirname": "model.depth=4",
    }


def test_mark_failed_if_running(tmp_path):
    Run(tmp_path / "a").begin(job(tmp_path, "a"), CFG)
    mark_failed_if_running(tmp_path / "a", "rank 1 died (exit code -9)")
    assert Run(tmp_path / "a").record()["error"]["message"] == "rank 1 died (exit code -9)"
    Run(tmp_path / "b").begin(job(tmp_path, "b"), CFG)
    Run(tmp_path / "b").finish("completed")
    mark_failed_if_running(tmp_path / "b", "ignored")
    assert Run(tmp_path / "b").record()["status"] == "completed"


def test_metrics_reader_skips_a_torn_line(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"step": 1})
    w.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1]
    assert list(read_metrics(tmp_path / "missing.jsonl")) == []


def test_atomic_write_and_latest_link_replace(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "one")
    atomic_write_text(tmp_path / "f.txt", "two")
    assert (tmp_path / "f.txt").read_text() == "two" and os.listdir(tmp_path) == ["f.txt"]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        update_latest_link(tmp_path / "latest", tmp_path / name)
    assert os.readlink(tmp_path / "latest") == "b"


def test_summary_lists_every_job_with_status_and_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    for n, (status, loss) in enumerate([("completed", 1.5), ("failed", None), ("running", None)]):
        d = sweep / f"{n}_model.softcap={10 + 5 * n}"
        run = Run(d)
        run.begin(job(tmp_path, f"sweep/{d.name}", multirun=True), {**CFG, "model": {"softcap": 10 + 5 * n}})
        if loss is not None:
            run.set_final_metrics(loss=loss)
        if status != "running":
            run.finish(status, RuntimeError("boom") if status == "failed" else None)
    (sweep / "3_model.softcap=25" / ".hydra").mkdir(parents=True)  # a job that never started
    (sweep / "3_model.softcap=25" / ".hydra" / "overrides.yaml").write_text("- model.softcap=25\n")
    (sweep / ".submitit").mkdir()
    rows = write_summary(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed"), (2, "running"), (3, "missing")]
    assert (
        rows[0]["loss"] == 1.5
        and rows[1]["error"] == "RuntimeError: boom"
        and rows[3]["overrides"] == "model.softcap=25"
    )
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:4] == ["job", "status", "overrides", "loss"] and len(csv_lines) == 5
    md = (sweep / "summary.md").read_text()
    assert "4 jobs: 1 completed, 1 failed, 1 missing, 1 running" in md and "| 1 | failed |" in md
