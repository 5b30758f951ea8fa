"""Comparing runs: the config keys that differ, final/best metrics, grouping by a key (seeds -> mean ± std)."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, Optional

from chatlm.runs.index import RunInfo

# Recorded values, not config keys. Which config keys do not change results is declared on the
# schema fields (chatlm.config.keys): those are listed apart, not as columns.
NOT_CONFIG = ("derived", "hydra", "run_dir", "output_dir")
_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}-\d{2}-\d{2}")
_HIGHER_IS_BETTER = ("acc", "core", "score", "reward", "win")


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def _changes_results(key: str, stages: set) -> bool:
    from chatlm.config import stage_schema
    from chatlm.config.keys import is_result_key

    return all(is_result_key(stage_schema(stage), key) for stage in stages)


def differing_keys(runs: list[RunInfo], results: bool = True) -> list[str]:
    """Flattened resolved-config keys whose values are not the same in every run: those that change
    results (`results=False`: the others, e.g. hardware or paths, which compare lists apart).

    A key whose values all look like date/time stamps (a run name with its launch time) is noise too.
    """
    flats = [r.flat_config() for r in runs]
    stages = {r.stage for r in runs}
    keys = sorted(
        {k for f in flats for k in f if k.split(".", 1)[0] not in NOT_CONFIG and _changes_results(k, stages) == results}
    )
    out = []
    for key in keys:
        values = [f.get(key, "<absent>") for f in flats]
        if all(repr(v) == repr(values[0]) for v in values):
            continue
        if all(isinstance(v, str) and _STAMP.search(v) for v in values):
            continue
        out.append(key)
    return out


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def higher_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in _HIGHER_IS_BETTER)


def metric_values(run: RunInfo, metric: str) -> tuple[Optional[float], Optional[float]]:
    """(final, best) of a metric: final from run.json (else the last logged value), best over
    metrics.jsonl and the final value (min; max for accuracy/score-like names)."""
    rows = [_number(r.get(metric)) for r in run.metrics()]
    logged = [v for v in rows if v is not None]
    final = _number(run.final_metrics.get(metric))
    if final is None and logged:
        final = logged[-1]
    candidates = logged + ([final] if final is not None else [])
    if not candidates:
        return final, None
    return final, (max(candidates) if higher_is_better(metric) else min(candidates))


def curve(run: RunInfo, metric: str, x: str = "tokens") -> list[tuple[float, float]]:
    """(x, value) points of a metric, x = tokens or flops (tokens x derived.flops_per_token)."""
    scale = 1.0
    if x == "flops":
        from chatlm.runs.plot import flops_per_token

        fpt = flops_per_token(run)
        if fpt is None:
            return []
        scale = fpt
    points = []
    for row in run.metrics():
        value, tokens = _number(row.get(metric)), _number(row.get("tokens"))
        if value is not None and tokens is not None:
            points.append((tokens * scale, value))
    return sorted(points)


def value_at(points: list[tuple[float, float]], at: float) -> Optional[float]:
    """The metric at x = `at`: linear interpolation between the logged points around it (None
    outside the logged range)."""
    if not points or at < points[0][0] or at > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return points[-1][1]


def common_horizon(runs: list[RunInfo], metric: str, x: str) -> Optional[float]:
    """The largest x (tokens or FLOPs) that every run with this metric logged it at."""
    ends = [c[-1][0] for c in (curve(r, metric, x) for r in runs) if c]
    return min(ends) if ends else None


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n-1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def fmt_stat(values: list[float]) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    if std is None:
        return f"{mean:.6g} (n=1)"
    return f"{mean:.6g} ± {std:.3g} (n={len(values)})"


def compare_table(
    runs: list[RunInfo], metrics: list[str], at: Optional[str] = None, at_value: Optional[float] = None
) -> tuple[list[str], list[list[str]]]:
    """One row per run: name, status, the differing config keys, final and best of each metric, and
    with `at` = "tokens" or "flops" the metric at equal tokens/FLOPs (`at_value`, default the
    common horizon: the most that every run reached), interpolated between logged points."""
    keys = differing_keys(runs)
    headers = ["run", "status", *keys]
    horizons: dict[str, Optional[float]] = {}
    for m in metrics:
        headers += [m, f"best {m}"]
        if at:
            horizons[m] = at_value if at_value is not None else common_horizon(runs, m, at)
            headers.append(f"{m} @ {fmt(horizons[m])} {at}")
    rows = []
    for r in runs:
        flat = r.flat_config()
        row = [r.path.name if r.record.get("sweep") else r.name, r.display_status]
        row += [fmt(flat.get(k)) if k in flat else "<absent>" for k in keys]
        for m in metrics:
            final, best = metric_values(r, m)
            row += [fmt(final), fmt(best)]
            if at:
                h = horizons[m]
                row.append(fmt(value_at(curve(r, m, at), h)) if h is not None else "")
        rows.append(row)
    return headers, rows


def group_table(
    runs: list[RunInfo], by: str, metrics: list[str], statuses: tuple[str, ...] = ("completed",)
) -> tuple[list[str], list[list[str]]]:
    """One row per value of config key `by` (runs with the given statuses): n and mean ± std (n-1)
    of the final and the best value of each metric over the runs (seeds) of the group."""
    groups: dict[str, list[RunInfo]] = {}
    order: dict[str, Any] = {}
    for r in runs:
        if r.status not in statuses:
            continue
        flat = r.flat_config(with_derived=True)
        value = flat.get(by, "<absent>")
        label = fmt(value)
        groups.setdefault(label, []).append(r)
        order.setdefault(label, value)
    headers = [by, "n"]
    for m in metrics:
        headers += [m, f"best {m}"]
    rows = []

    def sort_key(label: str) -> tuple:
        v = order[label]
        return (0, float(v), "") if _number(v) is not None else (1, 0.0, label)

    for label in sorted(groups, key=sort_key):
        members = groups[label]
        row = [label, str(len(members))]
        for m in metrics:
            pairs = [metric_values(r, m) for r in members]
            row.append(fmt_stat([f for f, _ in pairs if f is not None]))
            row.append(fmt_stat([b for _, b in pairs if b is not None]))
        rows.append(row)
    return headers, rows


# ----------------------------------------------------------------------------------------------
# settings over seeds: runs that differ only in their seed, mean ± std and Welch's t-test


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "seed"


def setting_keys(runs: list[RunInfo]) -> list[str]:
    """The differing config keys that define a setting: all of them but the seed(s)."""
    return [k for k in differing_keys(runs) if not is_seed_key(k)]


def has_repeated_seeds(runs: list[RunInfo], statuses: tuple[str, ...] = ("completed",)) -> bool:
    """True if some setting holds two or more (completed) runs that differ in their seed."""
    runs = [r for r in runs if r.status in statuses]
    if not any(is_seed_key(k) for k in differing_keys(runs)):
        return False
    return any(len(members) > 1 for _, members in group_settings(runs, setting_keys(runs)))


def _setting_of(run: RunInfo, keys: list[str]) -> tuple:
    flat = run.flat_config()
    return tuple(flat.get(k, "<absent>") for k in keys)


def _sort_value(value: Any) -> tuple:
    return (0, float(value), "") if _number(value) is not None else (1, 0.0, fmt(value))


def group_settings(runs: list[RunInfo], keys: list[str]) -> list[tuple[tuple, list[RunInfo]]]:
    """(setting values, runs) per distinct setting, sorted by the values (numbers numerically)."""
    groups: dict[str, tuple[tuple, list[RunInfo]]] = {}
    for r in runs:
        values = _setting_of(r, keys)
        groups.setdefault(repr(values), (values, []))[1].append(r)
    return sorted(groups.values(), key=lambda g: tuple(_sort_value(v) for v in g[0]))


def _matches(values: tuple, keys: list[str], conditions: list[str]) -> bool:
    import yaml

    by_key = dict(zip(keys, values))
    for cond in conditions:
        key, _, expected = cond.partition("=")
        key = key.strip()
        if key not in by_key:
            return False
        try:
            parsed = yaml.safe_load(expected)
        except yaml.YAMLError:
            parsed = expected
        if by_key[key] != parsed and fmt(by_key[key]) != expected:
            return False
    return True


def find_baseline(settings: list[tuple[tuple, list[RunInfo]]], keys: list[str], baseline: Optional[list[str]]) -> int:
    """Index of the baseline setting: the first one, or the one matching every KEY=VALUE of `baseline`.

    Raises ValueError naming the settings when none matches (or a key is not a setting key)."""
    if not baseline:
        return 0
    for cond in baseline:
        if "=" not in cond:
            raise ValueError(f"--baseline {cond!r}: expected KEY=VALUE")
        if cond.partition("=")[0].strip() not in keys:
            raise ValueError(
                f"--baseline {cond!r}: {cond.partition('=')[0]!r} is not a key that differs "
                f"between the settings ({', '.join(keys) or 'none'})"
            )
    for i, (values, _) in enumerate(settings):
        if _matches(values, keys, baseline):
            return i
    known = "; ".join(", ".join(f"{k}={fmt(v)}" for k, v in zip(keys, values)) for values, _ in settings)
    raise ValueError(f"--baseline {' '.join(baseline)}: no setting matches (settings: {known})")


def final_values(runs: list[RunInfo], metric: str) -> list[float]:
    return [f for f, _ in (metric_values(r, metric) for r in runs) if f is not None]


def fmt_p(p: Optional[float]) -> str:
    return "" if p is None else f"{p:.3g}"


def welch_p(values: list[float], baseline: list[float]) -> Optional[float]:
    from chatlm.runs.stats import welch_t_test

    result = welch_t_test(values, baseline)
    return None if result is None else result.p


def seed_table(
    runs: list[RunInfo],
    metrics: list[str],
    baseline: Optional[list[str]] = None,
    split: bool = False,
    statuses: tuple[str, ...] = ("completed",),
) -> tuple[list[str], list[list[str]]]:
    """One row per setting (the completed runs that differ only in their seed): n, then per metric the
    mean ± sample std of the final values and the two-sided Welch t-test p-value against the
    baseline setting. `split` (for CSV) gives mean and std as separate numeric columns."""
    done = [r for r in runs if r.status in statuses]
    keys = setting_keys(done)
    settings = group_settings(done, keys)
    base = find_baseline(settings, keys, baseline) if settings else 0
    headers = [*keys, "n"]
    for m in metrics:
        headers += [f"{m} mean", f"{m} std", f"p {m}"] if split else [m, f"p {m}"]
    rows = []
    for i, (values, members) in enumerate(settings):
        row = [fmt(v) for v in values] + [str(len(members))]
        for m in metrics:
            vals, base_vals = final_values(members, m), final_values(settings[base][1], m)
            p = "baseline" if i == base else fmt_p(welch_p(vals, base_vals))
            if split:
                mean, std = mean_std(vals) if vals else (None, None)
                row += [fmt(mean), fmt(std), p]
            else:
                row += [fmt_stat(vals), p]
        rows.append(row)
    return headers, rows


def render(headers: list[str], rows: list[list[str]], fmt_name: str = "table") -> str:
    """Plain text: aligned columns (`table`), a Markdown table (`md`) or CSV (`csv`)."""
    if fmt_name == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(headers)
        w.writerows(rows)
        return buf.getvalue()
    if fmt_name == "md":
        esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in esc]
        return "\n".join(lines) + "\n"
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines) + "\n"
