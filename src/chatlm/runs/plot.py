"""`chatlm runs plot`: curves of a metric from metrics.jsonl, one line per run, as a PNG (matplotlib, Agg).

Plain functions, no Hydra. The x axis is the step, the tokens seen, the training FLOPs (tokens x
`derived.flops_per_token` from config.resolved.yaml) or the time (`train_time_s`, else wall-clock
from the first row). Lines are labelled by the config keys that differ between the plotted runs.
A run that cannot give a curve (no such metric, no FLOPs per token, no metrics.jsonl) is left out
with a note appended to the `notes` list, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from chatlm.runs.compare import differing_keys, fmt
from chatlm.runs.index import RunInfo

X_AXES = ("tokens", "flops", "time", "step")
X_LABELS = {"tokens": "tokens", "flops": "training FLOPs", "time": "training time (s)", "step": "step"}
DEFAULT_SIZE = (1000, 600)  # pixels
DPI = 100


@dataclass(frozen=True)
class Series:
    """One drawn line: which run, its label, and the exact (x, y) values plotted."""

    metric: str
    label: str
    run: Path
    x: tuple[float, ...]
    y: tuple[float, ...]


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def flops_per_token(run: RunInfo) -> Optional[float]:
    """`derived.flops_per_token` from config.resolved.yaml (else a `derived` block in run.json)."""
    value = _number(run.derived.get("flops_per_token"))
    if value is None and isinstance(run.record.get("derived"), dict):
        value = _number(run.record["derived"].get("flops_per_token"))
    return value if value is not None and value > 0 else None


def tokens_of(row: dict[str, Any], run: RunInfo) -> Optional[float]:
    """`tokens` of a row, else step x the derived batch size."""
    tokens = _number(row.get("tokens"))
    if tokens is not None:
        return tokens
    step, batch = _number(row.get("step")), _number(run.derived.get("total_batch_size"))
    return step * batch if step is not None and batch is not None else None


def time_axis(rows: list[dict[str, Any]]) -> list[Optional[float]]:
    """Seconds per row: `train_time_s` (rows without it, such as evals, take the last value seen),
    or, for runs that never log it, wall-clock seconds since the first row's `time`."""
    if any(_number(r.get("train_time_s")) is not None for r in rows):
        out, last = [], 0.0
        for r in rows:
            value = _number(r.get("train_time_s"))
            last = value if value is not None else last
            out.append(last)
        return out
    times = [_number(r.get("time")) for r in rows]
    first = next((t for t in times if t is not None), None)
    return [None if t is None or first is None else t - first for t in times]


def x_values(run: RunInfo, rows: list[dict[str, Any]], x_axis: str) -> list[Optional[float]]:
    """The x value of every row on the chosen axis (None where it cannot be known)."""
    if x_axis == "step":
        return [_number(r.get("step")) for r in rows]
    if x_axis == "time":
        return time_axis(rows)
    tokens = [tokens_of(r, run) for r in rows]
    if x_axis == "tokens":
        return tokens
    fpt = flops_per_token(run)
    return [None if t is None or fpt is None else t * fpt for t in tokens]


def dedupe_by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in file order, a step logged twice for the same keys (re-done after a resume) kept once: the last."""
    last_index: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        if r.get("step") is not None:
            last_index[(r.get("step"), tuple(sorted(r)))] = i
    return [
        r for i, r in enumerate(rows) if r.get("step") is None or last_index[(r.get("step"), tuple(sorted(r)))] == i
    ]


def curve(run: RunInfo, metric: str, x_axis: str, notes: list[str]) -> Optional[tuple[list[float], list[float]]]:
    """(x, y) of a metric over the run's metrics.jsonl, sorted by x; None (with a note) if there is none."""
    rows = dedupe_by_step(run.metrics())
    if not rows:
        notes.append(f"{run.path}: skipped for {metric} (no readable rows in metrics.jsonl)")
        return None
    if not any(_number(r.get(metric)) is not None for r in rows):
        notes.append(f"{run.path}: skipped for {metric} (metrics.jsonl has no {metric} values)")
        return None
    if x_axis == "flops" and flops_per_token(run) is None:
        notes.append(f"{run.path}: skipped for {metric} (no derived.flops_per_token in config.resolved.yaml)")
        return None
    xs = x_values(run, rows, x_axis)
    points = sorted(
        (x, y) for x, y in zip(xs, (_number(r.get(metric)) for r in rows)) if x is not None and y is not None
    )
    if not points:
        notes.append(f"{run.path}: skipped for {metric} (no row has both {metric} and {x_axis})")
        return None
    return [p[0] for p in points], [p[1] for p in points]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what exists so far)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def run_labels(runs: list[RunInfo]) -> list[str]:
    """`key=value, ...` over the config keys that differ between the runs; the run name if none
    differ; the status appended for runs that did not complete; made unique with the directory name."""
    keys = differing_keys(runs) if len(runs) > 1 else []
    labels = []
    for r in runs:
        flat = r.flat_config()
        label = ", ".join(f"{k}={fmt(flat[k]) if k in flat else '<absent>'}" for k in keys) or r.name
        if r.display_status != "completed":
            label += f" [{r.display_status}]"
        labels.append(label)
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} ({runs[i].path.name})"
    return labels


def collect_series(
    runs: list[RunInfo], metrics: list[str], x_axis: str, smooth_n: int, notes: list[str]
) -> list[Series]:
    """Every (run, metric) curve that can be drawn, labelled; the others noted."""
    if x_axis not in X_AXES:
        raise ValueError(f"x axis {x_axis!r}: expected one of {', '.join(X_AXES)}")
    labels = run_labels(runs)
    out = []
    for metric in metrics:
        for run, label in zip(runs, labels):
            xy = curve(run, metric, x_axis, notes)
            if xy is not None:
                out.append(Series(metric, label, run.path, tuple(xy[0]), tuple(smooth(xy[1], smooth_n))))
    return out


def _log_y(ax: Any) -> None:
    """A log y axis with plain numbers (2.4, 3) on its ticks rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def draw(
    series: list[Series],
    metrics: list[str],
    x_axis: str,
    out: Path,
    *,
    logy: bool = False,
    size: tuple[int, int] = DEFAULT_SIZE,
    smooth_n: int = 1,
) -> Path:
    """One panel per metric (side by side), one line per run, saved as a PNG of exactly `size` pixels."""
    fig = build_figure(series, metrics, x_axis, logy=logy, size=size, smooth_n=smooth_n)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def build_figure(
    series: list[Series],
    metrics: list[str],
    x_axis: str,
    *,
    logy: bool = False,
    size: tuple[int, int] = DEFAULT_SIZE,
    smooth_n: int = 1,
) -> Any:
    """The matplotlib Figure `draw` saves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    shown = [m for m in metrics if any(s.metric == m for s in series)]
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, metric in zip(axes, shown):
        for s in (s for s in series if s.metric == metric):
            ax.plot(s.x, s.y, label=s.label, marker="." if len(s.x) < 30 else None)
        title = metric + (f" (moving average of {smooth_n})" if smooth_n > 1 else "")
        ax.set_title(title)
        ax.set_xlabel(X_LABELS[x_axis])
        ax.set_ylabel(metric)
        if logy:
            _log_y(ax)
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, axes)
    return fig


def _figure_legend(fig: Any, axes: Any) -> None:
    """One legend for all panels, outside on the right, each label wrapped: runs of different kinds
    label themselves with many differing keys, and a one-line label of 200 characters is wider than
    the figure (the constrained layout shrinks the panels to make room)."""
    import textwrap

    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        return
    labels = [textwrap.fill(label, 48, break_long_words=False, break_on_hyphens=False) for label in entries]
    lines = sum(label.count("\n") + 1 for label in labels) + len(labels)  # + the spacing between entries
    height_pt = fig.get_figheight() * 72 * 0.9
    size = max(3.0, min(8.0, height_pt / (1.25 * lines)))  # points: the whole legend fits the figure's height
    fig.legend(list(entries.values()), labels, loc="outside right upper", frameon=False, fontsize=size)


def plot_runs(
    runs: list[RunInfo],
    metrics: list[str],
    x_axis: str,
    out: Path,
    *,
    logy: bool = False,
    smooth_n: int = 1,
    size: tuple[int, int] = DEFAULT_SIZE,
    notes: Optional[list[str]] = None,
) -> list[Series]:
    """Draw the curves of `runs` into the PNG `out` and return what was drawn (nothing written if empty)."""
    notes = notes if notes is not None else []
    series = collect_series(runs, metrics, x_axis, smooth_n, notes)
    if series:
        draw(series, metrics, x_axis, out, logy=logy, size=size, smooth_n=smooth_n)
    return series


def parse_size(text: str) -> tuple[int, int]:
    """`1000x600` -> (1000, 600) pixels."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = (0, 0)
    if not sep or not (50 <= size[0] <= 10000 and 50 <= size[1] <= 10000):
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1000x600")
    return size
