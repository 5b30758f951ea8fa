"""`chatlm pipeline run|show` and `chatlm report`: the command-line edge of `chatlm.pipeline`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chatlm.errors import ChatlmError, UsageError


def _fail(what: str, e: ChatlmError) -> int:
    print(f"chatlm {what}: {e.label}: {e}", file=sys.stderr)
    return e.exit_code


def _run(args: argparse.Namespace) -> int:
    from chatlm.config.tree import conf_dir
    from chatlm.hydra.compose import stage_config_hash
    from chatlm.pipeline.report import build_report
    from chatlm.pipeline.runner import Options, Runner, default_directory, summary_lines
    from chatlm.pipeline.spec import load_pipeline, parse_vars, pipeline_file

    try:
        pipeline = load_pipeline(pipeline_file(args.pipeline, conf_dir()))
        values = parse_vars(args.var, pipeline)
        include = {n for item in args.with_ or [] for n in item.split(",") if n}
        unknown = include - {s.name for s in pipeline.stages if s.optional} - {"all"}
        if unknown:
            optional = ", ".join(s.name for s in pipeline.stages if s.optional) or "none"
            raise UsageError(f"--with {','.join(sorted(unknown))}: not an optional stage (optional: {optional})")
        directory = Path(args.dir).expanduser() if args.dir else default_directory(pipeline)
        options = Options(directory=directory, vars=values, include=include, dry_run=args.dry_run, env=dict(os.environ))
        runner = Runner(pipeline, options, stage_config_hash)
        print(f"pipeline {pipeline.name} in {runner.dir}")
        record = runner.run()
    except KeyboardInterrupt:
        print("chatlm pipeline: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except ChatlmError as e:
        return _fail("pipeline", e)
    print("\n".join(["stages:", *summary_lines(record)]))
    if args.dry_run:
        return 0
    text, path = build_report(runner.dir)
    print(f"\n{text}\nreport: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from chatlm.pipeline.report import build_report, report_json

    try:
        if args.json:
            print(report_json(Path(args.dir)))
            return 0
        text, path = build_report(Path(args.dir))
    except ChatlmError as e:
        return _fail("report", e)
    print(text)
    print(f"written to {path}", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("pipeline", help="run several stages in a row (conf/pipeline/): quickstart, speedrun")
    pl_sub = pl.add_subparsers(dest="pipeline_command", required=True)
    run = pl_sub.add_parser(
        "run",
        help="run a pipeline; the same command again skips completed stages and resumes an interrupted one",
    )
    run.add_argument("pipeline", help="a shipped pipeline (quickstart, speedrun, ...) or a pipeline .yaml file")
    run.add_argument("--dir", help="the pipeline directory (default <output root>/pipelines/<name>)")
    run.add_argument("--var", action="append", metavar="NAME=VALUE", help="set one of the pipeline's vars; repeatable")
    run.add_argument(
        "--with", dest="with_", action="append", metavar="STAGE", help="also run these optional stages (or all)"
    )
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    run.set_defaults(func=_run)
    rp = sub.add_parser("report", help="the report card of a pipeline or run directory (writes report.md)")
    rp.add_argument("dir", help="a pipeline directory (pipeline.json) or a run directory (run.json)")
    rp.add_argument("--json", action="store_true", help="print the stages and their metrics as JSON instead")
    rp.set_defaults(func=_report)
