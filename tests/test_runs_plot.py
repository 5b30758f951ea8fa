"""`chatlm runs plot` on synthetic run directories written by the real run writer: the PNG and the data drawn."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from chatlm.cli import main
from chatlm.runs.index import find_runs, load_run
from chatlm.runs.plot import plot_runs, smooth
from chatlm.runtime.rundir import JobInfo, Run

BATCH = 1000  # tokens per step
FPT = {3.0: 5_000, 30.0: 7_000}  # flops per token recorded by each run (differs on purpose)
# eval rows (step, val_bpb) of the two completed runs, by softcap
EVALS = {3.0: [(0, 3.5), (10, 2.9), (20, 2.6)], 30.0: [(0, 3.5), (10, 2.8), (20, 2.4)]}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _make(root: Path, name: str, softcap: float, seed: int = 0, fpt: int | None = None) -> Run:
    run_dir = root / "train" / "2026-11-24" / name
    job = JobInfo(
        stage="train",
        run_dir=str(run_dir),
        output_root=str(root),
        multirun=False,
        sweep_dir=None,
        job_num=None,
        override_dirname="",
        overrides=[f"model.softcap={softcap:g}"],
        choices={"model": "tiny"},
    )
    cfg = {
        "stage": "train",
        "run_name": "plot",
        "seed": seed,
        "model": {"depth": 2, "softcap": softcap},
        "paths": {"run_dir": str(run_dir)},
    }
    derived = {"total_batch_size": BATCH}
    if fpt is not None:
        derived["flops_per_token"] = fpt
    run = Run(run_dir)
    run.begin(job, cfg, derived=derived)
    return run


def _close(run: Run) -> None:
    if run.metrics is not None:
        run.metrics.close()
        run.metrics = None


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plot") / "outputs"
    for softcap in (3.0, 30.0):
        run = _make(root, f"sc{softcap:g}", softcap, fpt=FPT[softcap])
        evals = dict(EVALS[softcap])
        for step in range(0, 21):
            if step > 0:
                run.log_metrics(step=step, tokens=step * BATCH, loss=5.0 - 0.1 * step, train_time_s=0.5 * step)
            if step in evals:
                run.log_metrics(step=step, tokens=step * BATCH, val_bpb=evals[step])
        run.set_final_metrics(val_bpb=evals[20])
        run.finish("completed")
    # still running, no flops_per_token recorded, a torn last line, eval rows without `tokens`
    live = _make(root, "live", 15.0)
    live.log_metrics(step=5, loss=4.0, train_time_s=2.0)
    live.log_metrics(step=10, val_bpb=3.0)
    _close(live)
    with open(live.path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "step": 11, "val_bp')
    # crashed: says running, silent for two hours, only training rows (no val_bpb)
    dead = _make(root, "dead", 9.0, fpt=6_000)
    dead.log_metrics(step=1, tokens=BATCH, loss=5.0)
    _close(dead)
    old = time.time() - 7200
    for p in (dead.path / "run.json", dead.path / "metrics.jsonl"):
        os.utime(p, (old, old))
    # another tool's directory and a broken run.json
    (root / "tool" / "x").mkdir(parents=True)
    (root / "tool" / "x" / "metrics.jsonl").write_text('{"val_bpb": 1}\n')
    (root / "other").mkdir()
    (root / "other" / "run.json").write_text("{not json")
    return root


def _by_label(series, metric="val_bpb"):
    return {s.label: s for s in series if s.metric == metric}


def test_plot_tokens_png_and_data(runs_root, tmp_path, capsys):
    done = [runs_root / "train" / "2026-11-24" / n for n in ("sc3", "sc30")]
    out = tmp_path / "img" / "p.png"
    assert (
        main(
            [
                "runs",
                "plot",
                *map(str, done),
                "--metric",
                "val_bpb",
                "--x",
                "tokens",
                "--out",
                str(out),
                "--size",
                "640x480",
            ]
        )
        == 0
    )
    assert png_size(out) == (640, 480)
    assert "2 curves of val_bpb from 2 runs" in capsys.readouterr().out
    series = plot_runs([load_run(d) for d in done], ["val_bpb"], "tokens", tmp_path / "q.png")
    by = _by_label(series)
    assert set(by) == {"model.softcap=3", "model.softcap=30"}
    s = by["model.softcap=30"]
    assert s.metric == "val_bpb" and s.x == (0.0, 10_000.0, 20_000.0) and s.y == (3.5, 2.8, 2.4)


def test_plot_flops_time_step_smooth_logy(runs_root, tmp_path):
    done = [load_run(runs_root / "train" / "2026-11-24" / n) for n in ("sc3", "sc30")]
    series = plot_runs(done, ["val_bpb", "loss"], "flops", tmp_path / "f.png", logy=True, size=(800, 300))
    assert png_size(tmp_path / "f.png") == (800, 300)
    assert sorted((s.metric, s.label) for s in series) == [
        ("loss", "model.softcap=3"),
        ("loss", "model.softcap=30"),
        ("val_bpb", "model.softcap=3"),
        ("val_bpb", "model.softcap=30"),
    ]
    v3 = _by_label(series)["model.softcap=3"]
    assert v3.x == (0.0, 10_000.0 * 5_000, 20_000.0 * 5_000)  # tokens x that run's flops/token
    loss30 = [s for s in plot_runs(done, ["loss"], "flops", tmp_path / "g.png") if s.label == "model.softcap=30"][0]
    assert loss30.x[:2] == (1_000.0 * 7_000, 2_000.0 * 7_000) and len(loss30.x) == 20
    # time: train_time_s; an eval row takes the last training time logged before it
    t = [s for s in plot_runs(done, ["val_bpb"], "time", tmp_path / "t.png") if s.label == "model.softcap=3"][0]
    assert t.x == (0.0, 5.0, 10.0) and t.y == (3.5, 2.9, 2.6)
    st = [s for s in plot_runs(done, ["loss"], "step", tmp_path / "s.png", smooth_n=3) if s.label == "model.softcap=3"][
        0
    ]
    raw = [5.0 - 0.1 * k for k in range(1, 21)]
    assert st.x == tuple(float(k) for k in range(1, 21))
    assert st.y[0] == pytest.approx(raw[0]) and st.y[1] == pytest.approx((raw[0] + raw[1]) / 2)
    assert st.y[5] == pytest.approx(sum(raw[3:6]) / 3)
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_plot_sweep_dir_skips_what_cannot_be_drawn(runs_root, tmp_path, capsys):
    """Running, crashed, torn-line, other-tool and broken runs: notes on stderr, never a traceback."""
    out = tmp_path / "all.png"
    assert main(["runs", "plot", str(runs_root), "--x", "flops", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err
    assert "live: skipped for val_bpb (no derived.flops_per_token" in err
    assert "dead: skipped for val_bpb (metrics.jsonl has no val_bpb values)" in err
    assert "tool/x: skipped (no run.json)" in err and "not valid JSON" in err
    assert "2 curves of val_bpb from 2 runs against flops" in captured.out
    assert png_size(out) == (1000, 600)


def test_plot_running_and_crashed_runs_are_drawn_with_their_status(runs_root, tmp_path):
    runs = find_runs([runs_root], [])
    series = plot_runs(runs, ["val_bpb", "loss"], "tokens", tmp_path / "a.png")
    live = [s for s in series if s.metric == "val_bpb" and "[running]" in s.label]
    assert len(live) == 1 and live[0].label == "model.softcap=15 [running]"
    assert live[0].x == (10_000.0,) and live[0].y == (3.0,)  # tokens from step x derived batch; torn line ignored
    dead = [s for s in series if "[running?]" in s.label]
    assert [(s.metric, s.label, s.y) for s in dead] == [("loss", "model.softcap=9 [running?]", (5.0,))]
    live_time = [s for s in plot_runs(runs, ["loss"], "time", tmp_path / "b.png") if "[running]" in s.label]
    assert live_time[0].x == (2.0,)


def test_plot_nothing_to_draw_is_a_clear_error(runs_root, tmp_path, capsys):
    out = tmp_path / "none.png"
    assert main(["runs", "plot", str(runs_root / "train" / "2026-11-24" / "dead"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nothing to plot" in err and "no val_bpb values" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["runs", "plot", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "not a run directory" in capsys.readouterr().err
    sc3 = runs_root / "train" / "2026-11-24" / "sc3"
    assert main(["runs", "plot", str(sc3), str(sc3.parent), "--out", str(out), "--x", "step"]) == 0
    assert "3 curves of val_bpb from 3 runs" in capsys.readouterr().out  # sc3 once (not 4); dead has no val_bpb
    assert main(["runs", "plot", str(runs_root), "--size", "big", "--out", str(out)]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_resumed_step_logged_twice_is_drawn_once(tmp_path):
    run = _make(tmp_path / "outputs", "resumed", 3.0, fpt=10)
    for step, loss in [(1, 5.0), (2, 4.8), (3, 4.7), (2, 4.9), (3, 4.6), (4, 4.5)]:  # killed after 3, resumed at 1
        run.log_metrics(step=step, tokens=step * BATCH, loss=loss)
    run.finish("completed")
    (s,) = plot_runs([load_run(run.path)], ["loss"], "step", tmp_path / "r.png")
    assert s.x == (1.0, 2.0, 3.0, 4.0) and s.y == (5.0, 4.9, 4.6, 4.5) and s.label == "plot"


def test_long_legends_stay_inside_the_figure():
    from pathlib import Path

    from chatlm.runs.plot import Series, build_figure

    # runs of different kinds: every label carries many differing keys (about 190 characters)
    labels = [
        f"stage={k} model.depth={d} optim.matrix_lr=0.0{d} schedule.kind=warmdown seed={d} "
        f"data.sources.0.path=/a/long/path/to/shards/{k}{d} tokenizer.name=bpe32k mixture=offline "
        f"hardware.device_batch_size={8 * d} run_name={k}_{d}"
        for k in ("train", "sft")
        for d in range(1, 5)
    ]
    series = [
        Series("val_bpb", label, Path(label), (0.0, 1.0, 2.0), (3.0, 2.0, 1.5 + i / 10))
        for i, label in enumerate(labels)
    ]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = build_figure(series, ["val_bpb"], "tokens")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (leg,) = fig.legends
    box, legend = fig.bbox, leg.get_window_extent(renderer)
    assert len(leg.get_texts()) == 8
    assert box.x0 - 1 <= legend.x0 and legend.x1 <= box.x1 + 1, (box, legend)
    assert box.y0 - 1 <= legend.y0 and legend.y1 <= box.y1 + 1, (box, legend)
