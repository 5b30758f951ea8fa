"""Finding and loading run directories (anything holding a run.json), for `chatlm runs ls/show/compare`.

Reading never raises on what other tools or dead runs leave behind: a run.json that is not valid
JSON, a missing or unreadable config.resolved.yaml, a torn metrics.jsonl line are skipped, and a
human-readable note is appended to the `notes` list the caller passes in (the CLI prints them on
stderr).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from chatlm.runtime.metrics import read_metrics
from chatlm.runtime.rundir import flatten

# A run whose record says "running" but whose files have not changed for this long is probably
# dead (killed without a chance to close its record): shown as "running?".
STALE_AFTER_S = 3600.0
# Files whose presence marks a directory as a run left without a run.json (worth a note).
_RUN_MARKERS = ("config.resolved.yaml", "metrics.jsonl")


def output_root() -> Path:
    return Path(os.environ.get("CHATLM_OUTPUT_ROOT") or "outputs")


def parse_time(text: Optional[str]) -> Optional[dt.datetime]:
    """An ISO timestamp from run.json as an aware datetime (None if absent or unparsable)."""
    if not text or not isinstance(text, str):
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.astimezone()


_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: Optional[dt.datetime] = None) -> dt.datetime:
    """`2026-11-24`, `2026-11-24T10:00`, or a span back from now: `90m`, `2h`, `3d`, `1w`."""
    now = now or dt.datetime.now(dt.UTC).astimezone()
    m = _AGO.match(text)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a date (2026-11-24), a time (2026-11-24T10:00) or a span (30m, 2h, 3d, 1w)"
        ) from None
    return value if value.tzinfo else value.astimezone()


def _position(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """tokens and train_time_s at `step` (from the last metrics row at or before it), so an eval
    score plots against tokens or time like the training curves."""
    out: dict[str, Any] = {}
    for row in rows:
        if isinstance(row.get("step"), int) and row["step"] <= step:
            for key in ("tokens", "train_time_s"):
                if key in row:
                    out[key] = row[key]
    return out


@dataclass
class RunInfo:
    """One run directory, as read from its run.json and config.resolved.yaml."""

    path: Path
    record: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # resolved config without `derived`
    derived: dict[str, Any] = field(default_factory=dict)
    stale: bool = False  # says "running" but nothing was written for STALE_AFTER_S
    _metrics: Optional[list[dict[str, Any]]] = field(default=None, repr=False)
    _eval_scores: Optional[dict[int, dict[str, Any]]] = field(default=None, repr=False)

    @property
    def stage(self) -> str:
        return str(self.record.get("stage") or "")

    @property
    def name(self) -> str:
        return str(self.record.get("run_name") or self.config.get("run_name") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "unknown")

    @property
    def display_status(self) -> str:
        return "running?" if self.stale else self.status

    @property
    def start(self) -> Optional[dt.datetime]:
        return parse_time(self.record.get("start_time"))

    @property
    def duration_s(self) -> Optional[float]:
        """Recorded duration; for a live run the time since its start (up to its last write if stale)."""
        value = self.record.get("duration_s")
        if isinstance(value, (int, float)):
            return float(value)
        start = self.start
        if start is None or self.status != "running":
            return None
        end = self.last_write() if self.stale else time.time()
        return max(0.0, end - start.timestamp())

    @property
    def final_metrics(self) -> dict[str, Any]:
        """run.json's final metrics, updated with the scores of `chatlm.eval` runs of the final
        checkpoint (`evals/step_<N>/*.json` at N = the run's last step): an evaluation the user ran
        afterwards wins over the in-training value of the same key (often on fewer examples).
        A run without a recorded last step takes its newest evaluated step."""
        value = self.record.get("final_metrics")
        final = dict(value) if isinstance(value, dict) else {}
        scores = self.eval_scores()
        last = final.get("steps")
        if isinstance(last, int) and last in scores:
            final.update(scores[last])
        elif scores and not isinstance(last, int):
            final.update(scores[max(scores)])
        return final

    def eval_scores(self) -> dict[int, dict[str, Any]]:
        """step -> scores of the completed evaluations copied into this run (later files win);
        read once per RunInfo (final_metrics is asked for once per table column)."""
        if self._eval_scores is None:
            self._eval_scores = self._read_eval_scores()
        return self._eval_scores

    def _read_eval_scores(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for path in sorted(self.path.glob("evals/step_*/*.json"), key=lambda p: (p.parent.name, p.stat().st_mtime)):
            try:
                data = json.loads(path.read_text())
                step = int(data["evaluated"]["step"])
                scores = data["scores"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if data.get("complete", True) and isinstance(scores, dict):
                out.setdefault(step, {}).update(scores)
        return out

    @property
    def overrides(self) -> list[str]:
        value = self.record.get("overrides")
        return [str(v) for v in value] if isinstance(value, list) else []

    @property
    def error(self) -> Optional[dict[str, Any]]:
        value = self.record.get("error")
        return value if isinstance(value, dict) else None

    @property
    def model(self) -> str:
        """The model choice (e.g. `d24`), else a name/depth from the config; with derived size if known."""
        choices = self.record.get("choices")
        label = choices.get("model") if isinstance(choices, dict) else None
        model_cfg = self.config.get("model") if isinstance(self.config.get("model"), dict) else {}
        if not label:
            label = model_cfg.get("name") or (f"d{model_cfg['depth']}" if "depth" in model_cfg else "")
        if not label:  # stages that take their model from a checkpoint (sft, rl) record its name
            label = self.derived.get("model_name") or ""
        for key in ("n_params", "num_params", "params"):
            n = self.derived.get(key)
            if isinstance(n, (int, float)) and n > 0:
                label = f"{label} ({_human(n)})" if label else _human(n)
                break
        return str(label or "")

    def flat_config(self, with_derived: bool = False) -> dict[str, Any]:
        flat = flatten(self.config) if self.config else {}
        if with_derived and self.derived:
            flat.update(flatten(self.derived, "derived."))
        return flat

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (torn/invalid lines skipped; empty if the file is missing),
        then one row per evaluated step with its eval scores, so curves of `core` or `gsm8k` plot."""
        if self._metrics is None:
            rows = list(read_metrics(self.path / "metrics.jsonl"))
            self._metrics = rows + [
                {"step": step, **_position(rows, step), **scores} for step, scores in sorted(self.eval_scores().items())
            ]
        return self._metrics

    def last_write(self) -> float:
        times = []
        for name in ("run.json", "metrics.jsonl", "logs"):
            try:
                times.append((self.path / name).stat().st_mtime)
            except OSError:
                pass
        logs = self.path / "logs"
        if logs.is_dir():
            for p in logs.iterdir():
                try:
                    times.append(p.stat().st_mtime)
                except OSError:
                    pass
        return max(times, default=0.0)


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def load_run(path: Path, notes: Optional[list[str]] = None, now: Optional[float] = None) -> Optional[RunInfo]:
    """The run in `path`, or None (with a note) if its run.json is missing or not a JSON object."""
    notes = notes if notes is not None else []
    path = Path(path)
    try:
        text = (path / "run.json").read_text()
    except OSError as e:
        notes.append(f"{path}: skipped (no readable run.json: {e.strerror or e})")
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        notes.append(f"{path}: skipped (run.json is not valid JSON: {e.msg} at line {e.lineno})")
        return None
    if not isinstance(record, dict):
        notes.append(f"{path}: skipped (run.json is not a JSON object)")
        return None
    config: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    cfg_path = path / "config.resolved.yaml"
    if cfg_path.exists():
        try:
            data = yaml.safe_load(cfg_path.read_text())
        except (OSError, yaml.YAMLError) as e:
            notes.append(f"{path}: config.resolved.yaml unreadable ({type(e).__name__}); config columns empty")
            data = None
        if isinstance(data, dict):
            d = data.pop("derived", None)
            derived = d if isinstance(d, dict) else {}
            config = data
    info = RunInfo(path=path, record=record, config=config, derived=derived)
    if info.status == "running":
        now = time.time() if now is None else now
        info.stale = now - info.last_write() > STALE_AFTER_S
    return info


def find_runs(paths: list[Path], notes: Optional[list[str]] = None) -> list[RunInfo]:
    """Every run under `paths` (recursively; sweep job dirs included), each directory once.

    A directory holding run.json is a run and is not searched further; `latest` symlinks and
    hidden directories (.hydra) are not followed, so no run is listed twice.
    """
    notes = notes if notes is not None else []
    runs: list[RunInfo] = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            notes.append(f"{root}: no such directory")
            continue
        if not root.is_dir():
            notes.append(f"{root}: not a directory")
            continue
        found_before = len(runs)
        for dirpath, dirnames, filenames in os.walk(
            root, onerror=lambda e: notes.append(f"{e.filename}: {e.strerror}")
        ):
            here = Path(dirpath)
            if "run.json" in filenames:
                dirnames[:] = []
                key = here.resolve()
                if key in seen:
                    continue
                seen.add(key)
                info = load_run(here, notes)
                if info is not None:
                    runs.append(info)
                continue
            if any(m in filenames for m in _RUN_MARKERS):
                notes.append(f"{here}: skipped (no run.json)")
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
        if len(runs) == found_before and not any(n.startswith(str(root)) for n in notes):
            notes.append(f"{root}: no runs found")
    return runs


def resolve_run(spec: str, notes: Optional[list[str]] = None) -> Optional[RunInfo]:
    """A run directory given as a path, or as a run name / directory-name suffix under the output root."""
    notes = notes if notes is not None else []
    path = Path(spec)
    if (path / "run.json").exists():
        return load_run(path, notes)
    if path.is_dir():
        notes.append(f"{path}: no run.json here")
        return None
    root = output_root()
    candidates = (
        [r for r in find_runs([root], []) if r.name == spec or r.path.name.endswith(spec)] if root.is_dir() else []
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        notes.append(f"{spec}: not a run directory, and no run of that name under {root}")
    else:
        notes.append(
            f"{spec}: ambiguous, {len(candidates)} runs match: " + ", ".join(str(c.path) for c in candidates[:5])
        )
    return None


def match_where(run: RunInfo, condition: str) -> bool:
    """`key=value` against the flattened resolved config (derived values as `derived.<key>`)."""
    key, _, expected = condition.partition("=")
    flat = run.flat_config(with_derived=True)
    key = key.strip()
    if key not in flat:
        return False
    actual = flat[key]
    try:
        parsed = yaml.safe_load(expected)
    except yaml.YAMLError:
        parsed = expected
    return actual == parsed or str(actual) == expected


def filter_runs(
    runs: list[RunInfo],
    *,
    stage: Optional[str] = None,
    status: Optional[str] = None,
    since: Optional[dt.datetime] = None,
    where: Optional[list[str]] = None,
) -> list[RunInfo]:
    out = []
    for r in runs:
        if stage and r.stage != stage:
            continue
        if status and status not in (r.status, r.display_status):
            continue
        if since is not None and (r.start is None or r.start < since):
            continue
        if where and not all(match_where(r, c) for c in where):
            continue
        out.append(r)
    return out


def sort_runs(runs: list[RunInfo], key: str = "start") -> list[RunInfo]:
    """By start time, duration, or a final metric (ascending; runs missing the value last)."""

    def value(r: RunInfo) -> Any:
        if key == "start":
            return r.start.timestamp() if r.start else None
        if key == "duration":
            return r.duration_s
        v = r.final_metrics.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    keyed = [(value(r), i, r) for i, r in enumerate(runs)]
    keyed.sort(key=lambda t: (t[0] is None, t[0] if t[0] is not None else 0, t[1]))
    return [r for _, _, r in keyed]
