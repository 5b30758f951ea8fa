"""`chatlm runs ls / show / compare` on synthetic run directories written by the real run writer."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import pytest
import yaml

from chatlm.cli import main
from chatlm.runs.compare import differing_keys, mean_std, metric_values
from chatlm.runs.index import find_runs, parse_since
from chatlm.runtime.rundir import JobInfo, Run

# (softcap, seed, logged val_bpb rows, final val_bpb, train_loss) of the completed sweep jobs
JOBS = [
    (10.0, 1, [1.10, 0.89, 0.90], 0.90, 2.0),
    (10.0, 2, [1.10, 0.91, 0.92], 0.92, 2.1),
    (15.0, 1, [1.05, 0.84, 0.85], 0.85, 1.9),
    (15.0, 2, [1.05, 0.87, 0.88], 0.88, 1.8),
]


def _cfg(root: Path, run_dir: Path, softcap: float, seed: int, name: str) -> dict:
    return {
        "stage": "train",
        "run_name": name,
        "seed": seed,
        "resume": "auto",
        "model": {"depth": 4, "softcap": softcap, "n_embd": 256},
        "optim": {"lr": 0.02},
        "paths": {"output_root": str(root), "run_dir": str(run_dir)},
    }


def _start(i: int) -> str:
    return f"2026-11-2{0 + i // 10}T{10 + i % 10:02d}:00:00.000+00:00"


def _make(
    root: Path,
    run_dir: Path,
    *,
    softcap: float,
    seed: int,
    start: str,
    name: str = "sweep",
    sweep: Path | None = None,
    job_num: int | None = None,
    stage: str = "train",
) -> Run:
    overrides = [f"model.softcap={softcap:g}", f"seed={seed}"]
    job = JobInfo(
        stage=stage,
        run_dir=str(run_dir),
        output_root=str(root),
        multirun=sweep is not None,
        sweep_dir=str(sweep) if sweep else None,
        job_num=job_num,
        override_dirname=",".join(overrides),
        overrides=overrides,
        choices={"model": "d4"},
    )
    run = Run(run_dir)
    run.begin(job, _cfg(root, run_dir, softcap, seed, name), derived={"world_size": 1, "n_params": 12_500_000})
    run.update_record(start_time=start)
    return run


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "outputs"
    sweep = root / "train" / "multirun" / "2026-11-20" / "10-00-00"
    for i, (softcap, seed, rows, final, loss) in enumerate(JOBS):
        run = _make(
            root,
            sweep / f"{i}_model.softcap={softcap:g},seed={seed}",
            softcap=softcap,
            seed=seed,
            start=_start(i),
            sweep=sweep,
            job_num=i,
        )
        for step, v in enumerate(rows):
            run.log_metrics(step=(step + 1) * 100, val_bpb=v, train_loss=loss + 0.5 - 0.25 * step)
        run.set_final_metrics(val_bpb=final, min_val_bpb=min(rows), train_loss=loss)
        run.finish("completed")
        run.update_record(duration_s=600.0 + 60 * i)
    # job 4 failed mid-way, with a torn last metrics line
    failed = _make(
        root, sweep / "4_model.softcap=20,seed=1", softcap=20.0, seed=1, start=_start(4), sweep=sweep, job_num=4
    )
    failed.log_metrics(step=100, val_bpb=1.2, train_loss=2.6)
    failed.metrics.close()
    failed.metrics = None
    with open(failed.path / "metrics.jsonl", "a") as f:
        f.write('{"time":1,"step":200,"val_b')
    failed.finish("failed", RuntimeError("CUDA out of memory"))
    failed.update_record(duration_s=30.0)
    # a live single run, and one that says running but has been silent for two hours (crashed)
    live = _make(
        root, root / "train" / "2026-11-21" / "12-00-00-abcd_live", softcap=15.0, seed=3, start=_start(11), name="live"
    )
    live.log_metrics(step=100, val_bpb=1.0, train_loss=2.2)
    live.metrics.close()
    live.metrics = None
    dead = _make(
        root, root / "train" / "2026-11-21" / "09-00-00-dead_dead", softcap=10.0, seed=3, start=_start(10), name="dead"
    )
    dead.log_metrics(step=100, val_bpb=1.3)
    dead.metrics.close()
    dead.metrics = None
    old = time.time() - 7200
    for p in (dead.path / "run.json", dead.path / "metrics.jsonl"):
        os.utime(p, (old, old))
    # a completed run of another stage
    check = _make(
        root,
        root / "check" / "2026-11-22" / "08-00-00-beef_chk",
        softcap=15.0,
        seed=1,
        start=_start(20),
        name="chk",
        stage="check",
    )
    check.set_final_metrics(val_bpb=1.5)
    check.finish("completed")
    # directories from other tools
    bad = root / "other" / "garbage"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text('{"stage": "train", "status": ')
    (root / "tool" / "x").mkdir(parents=True)
    (root / "tool" / "x" / "metrics.jsonl").write_text('{"loss": 1}\n')
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("hello")
    return root


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """Split aligned plain-text output into header words and cell rows (cells separated by 2+ spaces)."""
    import re

    lines = _lines(text)
    split = [re.split(r"\s{2,}", line.strip()) for line in lines]
    return split[0], split[1:]


def test_ls_lists_every_run_and_notes_broken_dirs(outputs, capsys):
    assert main(["runs", "ls", str(outputs)]) == 0
    out, err = capsys.readouterr()
    header, rows = _table(out)
    assert header[:7] == ["stage", "name", "status", "start", "duration", "model", "overrides"]
    assert header[7:10] == ["val_bpb", "min_val_bpb", "train_loss"]
    assert len(rows) == 8  # 4 completed + 1 failed sweep jobs, live, dead, check
    assert "garbage" in err and "not valid JSON" in err
    assert "tool/x" in err and "no run.json" in err
    assert "Traceback" not in err
    # default sort: by start time, ascending
    names_status = [(r[1], r[2]) for r in rows]
    assert names_status == [("sweep", "completed")] * 4 + [
        ("sweep", "failed"),
        ("dead", "running?"),
        ("live", "running"),
        ("chk", "completed"),
    ]
    first = rows[0]
    assert first[3].startswith("2026-11-20") and first[4] == "10m00s"
    assert first[5] == "d4 (12.5M)" and first[6] == "model.softcap=10 seed=1"
    assert first[7:10] == ["0.9", "0.89", "2"]


def test_ls_filters_sort_last(outputs, capsys):
    main(["runs", "ls", str(outputs), "--stage", "train", "--status", "completed", "--sort", "val_bpb"])
    _, rows = _table(capsys.readouterr().out)
    assert [r[7] for r in rows] == ["0.85", "0.88", "0.9", "0.92"]
    main(["runs", "ls", str(outputs), "--where", "model.softcap=15", "--where", "seed=1"])
    _, rows = _table(capsys.readouterr().out)
    assert sorted(r[1] for r in rows) == ["chk", "sweep"]
    main(["runs", "ls", str(outputs), "--where", "derived.n_params=12500000", "--stage", "check"])
    _, rows = _table(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["chk"]
    main(["runs", "ls", str(outputs), "--sort", "duration", "--last", "2", "--status", "completed", "--stage", "train"])
    _, rows = _table(capsys.readouterr().out)
    assert [r[4] for r in rows] == ["12m00s", "13m00s"]
    main(["runs", "ls", str(outputs), "--since", "2026-11-21"])
    _, rows = _table(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["dead", "live", "chk"]
    main(["runs", "ls", str(outputs), "--status", "running"])
    _, rows = _table(capsys.readouterr().out)
    assert sorted(r[1] for r in rows) == ["dead", "live"]  # a stale run is still recorded as running
    assert main(["runs", "ls", str(outputs), "--since", "yesterday-ish"]) == 2
    assert "--since" in capsys.readouterr().err


def test_ls_json_and_env_default(outputs, capsys, monkeypatch):
    monkeypatch.setenv("CHATLM_OUTPUT_ROOT", str(outputs))
    assert main(["runs", "ls", "--json", "--status", "failed"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1
    rec = data[0]
    assert rec["status"] == "failed" and rec["stage"] == "train" and rec["duration_s"] == 30.0
    assert rec["error"] == "CUDA out of memory" and rec["overrides"] == ["model.softcap=20", "seed=1"]
    assert rec["model"] == "d4 (12.5M)" and rec["final_metrics"] == {}
    assert rec["path"].endswith("4_model.softcap=20,seed=1")
    main(["runs", "ls", "--json", "--stage", "train", "--status", "running"])
    data = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert data["dead"]["status"] == "running?" and data["dead"]["recorded_status"] == "running"
    assert data["live"]["status"] == "running" and data["live"]["duration_s"] > 0


def test_show_run(outputs, capsys):
    job = next((outputs / "train" / "multirun").rglob("0_model.softcap=10,seed=1"))
    assert main(["runs", "show", str(job)]) == 0
    out = capsys.readouterr().out
    assert "status       completed" in out and "duration_s   600" in out
    assert "  model.softcap = 10" in out and "  optim.lr = 0.02" in out
    assert "derived:" in out and "  n_params = 12500000" in out
    assert "last metrics row (3 rows):" in out and "  val_bpb = 0.9" in out
    assert "error:" not in out
    main(["runs", "show", str(job), "--config"])
    out = capsys.readouterr().out
    assert "config.resolved.yaml:" in out and "softcap: 10.0" in out and "derived:" in out
    failed = next((outputs / "train" / "multirun").rglob("4_model.softcap=20,seed=1"))
    assert main(["runs", "show", str(failed)]) == 0
    out = capsys.readouterr().out
    assert "error: RuntimeError: CUDA out of memory" in out
    assert "last metrics row (1 rows):" in out  # the torn line is skipped
    assert main(["runs", "show", str(outputs / "other" / "garbage")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_show_by_name_under_output_root(outputs, capsys, monkeypatch):
    monkeypatch.setenv("CHATLM_OUTPUT_ROOT", str(outputs))
    assert main(["runs", "show", "live"]) == 0
    out = capsys.readouterr().out
    assert "status       running" in out and "12-00-00-abcd_live" in out
    assert main(["runs", "show", "sweep"]) == 2
    assert "ambiguous" in capsys.readouterr().err
    assert main(["runs", "show", "nope"]) == 2


def test_compare_sweep_differing_keys_and_groups(outputs, capsys):
    sweep = outputs / "train" / "multirun" / "2026-11-20" / "10-00-00"
    assert main(["runs", "compare", str(sweep), "--metric", "val_bpb", "--by", "model.softcap"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    table, _, grouped = out.partition("grouped by model.softcap")
    header, rows = _table(table)
    assert header == ["run", "status", "model.softcap", "seed", "val_bpb", "best val_bpb"]
    assert len(rows) == 5
    assert rows[0] == ["0_model.softcap=10,seed=1", "completed", "10", "1", "0.9", "0.89"]
    assert rows[4] == ["4_model.softcap=20,seed=1", "failed", "20", "1", "1.2", "1.2"]
    grouped, _, seeds = grouped.partition("per setting over seeds")
    gheader, grows = _table(grouped.split("\n", 1)[1])
    assert gheader == ["model.softcap", "n", "val_bpb", "best val_bpb"]
    # by hand: softcap 10 finals 0.90, 0.92 -> mean 0.91, sample std sqrt(2 * 0.01^2 / 1) = 0.0141421
    assert grows[0] == ["10", "2", "0.91 ± 0.0141 (n=2)", "0.9 ± 0.0141 (n=2)"]
    # softcap 15 finals 0.85, 0.88 -> mean 0.865, std 0.0212132; bests 0.84, 0.87 -> 0.855 ± 0.0212
    assert grows[1] == ["15", "2", "0.865 ± 0.0212 (n=2)", "0.855 ± 0.0212 (n=2)"]
    assert len(grows) == 2  # the failed softcap=20 job is not grouped
    # seeds repeat per setting, so the seed table follows: baseline = the first setting (softcap 10).
    # Welch by hand: se^2 = 0.0002/2 + 0.00045/2 = 0.000325, t = -0.045/sqrt(0.000325) = -2.496,
    # df = 0.000325^2 / (0.0001^2 + 0.000225^2) = 1.742 -> two-sided p = 0.148
    assert "Welch t-test p vs the first setting" in seeds
    sheader, srows = _table(seeds.split("\n", 1)[1])
    assert sheader == ["model.softcap", "n", "val_bpb", "p val_bpb"]
    assert srows == [["10", "2", "0.91 ± 0.0141 (n=2)", "baseline"], ["15", "2", "0.865 ± 0.0212 (n=2)", "0.148"]]


def test_compare_seed_table_baseline_md_csv(outputs, capsys):
    sweep = outputs / "train" / "multirun" / "2026-11-20" / "10-00-00"
    assert (
        main(
            [
                "runs",
                "compare",
                str(sweep),
                "--baseline",
                "model.softcap=15",
                "--format",
                "md",
                "--metric",
                "val_bpb",
                "--metric",
                "train_loss",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    seeds = out.partition("per setting over seeds")[2]
    assert "p vs model.softcap=15" in seeds
    lines = _lines(seeds)[1:]
    assert lines[0] == "| model.softcap | n | val_bpb | p val_bpb | train_loss | p train_loss |"
    # train_loss 2.0, 2.1 vs 1.9, 1.8: t = 0.2 / sqrt(0.005/2 + 0.005/2) = 2.828, df = 2 -> p = 1 - t/sqrt(2+t^2)
    p_loss = 1 - 2.8284271 / math.sqrt(2 + 8)
    assert lines[2] == f"| 10 | 2 | 0.91 ± 0.0141 (n=2) | 0.148 | 2.05 ± 0.0707 (n=2) | {p_loss:.3g} |"
    assert lines[3] == "| 15 | 2 | 0.865 ± 0.0212 (n=2) | baseline | 1.85 ± 0.0707 (n=2) | baseline |"
    assert main(["runs", "compare", str(sweep), "--format", "csv"]) == 0
    seeds = capsys.readouterr().out.partition("per setting over seeds")[2]
    lines = _lines(seeds)[1:]
    assert lines[0] == "model.softcap,n,val_bpb mean,val_bpb std,p val_bpb"
    assert lines[1] == "10,2,0.91,0.0141421,baseline"
    assert lines[2] == "15,2,0.865,0.0212132,0.148"
    assert main(["runs", "compare", str(sweep), "--baseline", "model.softcap=99"]) == 2
    err = capsys.readouterr().err
    assert "no setting matches" in err and "model.softcap=10" in err and "Traceback" not in err
    assert main(["runs", "compare", str(sweep), "--baseline", "optim.lr=1"]) == 2
    assert "not a key that differs" in capsys.readouterr().err


def test_compare_formats_and_explicit_runs(outputs, capsys):
    sweep = outputs / "train" / "multirun" / "2026-11-20" / "10-00-00"
    a, b = sweep / "0_model.softcap=10,seed=1", sweep / "2_model.softcap=15,seed=1"
    assert (
        main(["runs", "compare", str(a), str(b), "--format", "csv", "--metric", "val_bpb", "--metric", "train_loss"])
        == 0
    )
    lines = _lines(capsys.readouterr().out)
    assert lines[0] == "run,status,model.softcap,val_bpb,best val_bpb,train_loss,best train_loss"
    assert lines[1] == '"0_model.softcap=10,seed=1",completed,10,0.9,0.89,2,2'  # the comma in the name is quoted
    main(["runs", "compare", str(a), str(b), "--format", "md"])
    lines = _lines(capsys.readouterr().out)
    assert lines[0] == "| run | status | model.softcap | val_bpb | best val_bpb |"
    assert lines[2] == "| 0_model.softcap=10,seed=1 | completed | 10 | 0.9 | 0.89 |"
    assert main(["runs", "compare", str(outputs / "other")]) == 2


def test_library_helpers(outputs):
    notes: list[str] = []
    runs = find_runs([outputs, outputs / "missing"], notes)
    assert len(runs) == 8 and any("missing" in n for n in notes)
    sweep_runs = [r for r in runs if r.record.get("sweep")]
    assert differing_keys(sweep_runs) == ["model.softcap", "seed"]
    r0 = min(sweep_runs, key=lambda r: r.path.name)
    assert metric_values(r0, "val_bpb") == (0.90, 0.89)
    assert metric_values(r0, "nope") == (None, None)
    m, s = mean_std([0.85, 0.88])
    assert math.isclose(m, 0.865) and math.isclose(s, statistics.stdev([0.85, 0.88]))
    assert mean_std([1.0]) == (1.0, None)
    assert parse_since("2h").timestamp() == pytest.approx(time.time() - 7200, abs=5)


def test_compare_at_equal_tokens_and_flops(tmp_path, capsys):
    root = tmp_path / "outputs"
    sweep = root / "sweeps" / "s"
    curves = {10.0: [(100, 2.0), (200, 1.0), (300, 0.5)], 15.0: [(100, 3.0), (250, 1.5)]}
    for i, (softcap, points) in enumerate(curves.items()):
        run = _make(
            root,
            sweep / f"{i}_model.softcap={softcap:g}",
            softcap=softcap,
            seed=1,
            start=_start(i),
            sweep=sweep,
            job_num=i,
        )
        run.record_derived(flops_per_token=10.0 * (i + 1))
        for tokens, v in points:
            run.log_metrics(step=tokens // 100, tokens=tokens, val_bpb=v)
        run.finish("completed")
    assert main(["runs", "compare", str(sweep), "--at", "tokens", "--format", "csv"]) == 0
    rows = list(__import__("csv").reader(capsys.readouterr().out.splitlines()))
    # the common horizon is 250 tokens (the second run's last point); run 0 interpolates 1.0 -> 0.5
    assert rows[0][-1] == "val_bpb @ 250 tokens"
    assert [r[-1] for r in rows[1:]] == ["0.75", "1.5"]
    assert main(["runs", "compare", str(sweep), "--at", "tokens", "--at-value", "150", "--format", "csv"]) == 0
    rows = list(__import__("csv").reader(capsys.readouterr().out.splitlines()))
    assert [r[-1] for r in rows[1:]] == ["1.5", "2.5"]  # (2.0+1.0)/2 and 3.0 + (1.5-3.0)*50/150
    # FLOPs: run 0 has 10 FLOPs/token (ends at 3000), run 1 has 20 (ends at 5000): horizon 3000 FLOPs
    assert main(["runs", "compare", str(sweep), "--at", "flops", "--format", "csv"]) == 0
    rows = list(__import__("csv").reader(capsys.readouterr().out.splitlines()))
    assert rows[0][-1] == "val_bpb @ 3000 flops"
    assert [r[-1] for r in rows[1:]] == ["0.5", "2.5"]  # run 1 at 150 tokens


def test_compare_lists_non_result_differences_apart(tmp_path, capsys):
    for i, batch in enumerate((4, 8)):
        run_dir = tmp_path / f"r{i}"
        run = _make(tmp_path, run_dir, softcap=15.0, seed=1, start=_start(i), name=f"r{i}")
        cfg = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        cfg["hardware"] = {"device_batch_size": batch}  # where/how it ran: not a result column
        (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
        run.set_final_metrics(val_bpb=1.0 + i)
        run.finish("completed")
    assert main(["runs", "compare", str(tmp_path / "r0"), str(tmp_path / "r1")]) == 0
    out = capsys.readouterr().out
    header, _ = _table(out.split("also differ")[0])
    assert "hardware.device_batch_size" not in header and header[:2] == ["run", "status"]
    assert "also differ, without changing results: hardware.device_batch_size" in out
