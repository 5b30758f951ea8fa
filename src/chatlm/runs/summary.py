"""summary.csv / summary.md of a sweep: one row per job directory, failed and unfinished jobs too."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from chatlm.runtime.rundir import atomic_write_text, read_json

_JOB_DIR = re.compile(r"^(\d+)_")
SWEEP_RECORD = "sweep.json"  # written by chatlm's submitit launchers (chatlm.hydra.launcher)
BASE_COLUMNS = ["job", "status", "overrides", "duration_s", "run_dir", "error"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (`<N>_<overrides>`), by job number."""
    found = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and _JOB_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_JOB_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def job_dirs_by_num(sweep_dir: Path) -> dict[int, Path]:
    """{job number: job directory} of a sweep."""
    return {int(_JOB_DIR.match(p.name).group(1)): p for p in job_dirs(sweep_dir)}  # type: ignore[union-attr]


def read_sweep_record(sweep_dir: Path) -> dict | None:
    """`<sweep>/sweep.json` (every point's job number, overrides, run directory, job id, logs), if any."""
    return read_json(Path(sweep_dir) / SWEEP_RECORD)


def write_sweep_record(sweep_dir: Path, record: dict) -> None:
    atomic_write_text(Path(sweep_dir) / SWEEP_RECORD, json.dumps(record, indent=2, default=str) + "\n")


def _overrides(job_dir: Path, record: dict) -> str:
    if record.get("overrides") is not None:
        return " ".join(record["overrides"])
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        import yaml

        return " ".join(yaml.safe_load(path.read_text()) or [])
    return ""


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: status from run.json ('missing' if the job never wrote one), final metrics."""
    rows = []
    for job_dir in job_dirs(sweep_dir):
        record = read_json(job_dir / "run.json") or {}
        error = record.get("error") or {}
        row: dict[str, Any] = {
            "job": int(_JOB_DIR.match(job_dir.name).group(1)),  # type: ignore[union-attr]
            "status": record.get("status", "missing"),
            "overrides": _overrides(job_dir, record),
            "duration_s": record.get("duration_s"),
            "run_dir": job_dir.name,
            "error": f"{error.get('type')}: {error.get('message')}" if error else "",
        }
        for key, value in sorted((record.get("final_metrics") or {}).items()):
            if isinstance(value, (int, float, str, bool)) or value is None:
                row[key] = value
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write summary.csv and summary.md at the sweep root and return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    metric_cols = sorted({k for r in rows for k in r} - set(BASE_COLUMNS))
    columns = BASE_COLUMNS[:3] + metric_cols + BASE_COLUMNS[3:]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _fmt(r.get(c)) for c in columns})
    atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())

    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        cells = [_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows
