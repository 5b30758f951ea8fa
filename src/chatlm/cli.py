"""The `chatlm` console script.

    chatlm --version
    chatlm groups [GROUP]               config groups and their options (from conf/)
    chatlm runs summarize SWEEP_DIR     (re)write a sweep's summary.csv / summary.md
    chatlm convert nanochat DIR OUT     import a nanochat checkpoint as a chatlm checkpoint

Stages are Hydra apps run as modules: `python -m chatlm.check`, `python -m chatlm.train`, ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatlm import __version__


def _groups(args: argparse.Namespace) -> int:
    from chatlm.app import config_groups, group_options

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
        path = import_nanochat(args.checkpoint_dir, args.out, step=args.step)
    except ChatlmError as e:
        print(f"chatlm convert nanochat: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


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
    conv = sub.add_parser("convert", help="convert checkpoints from other frameworks")
    conv_sub = conv.add_subparsers(dest="convert_command", required=True)
    n = conv_sub.add_parser("nanochat", help="import a nanochat checkpoint (model_<step>.pt + meta_<step>.json)")
    n.add_argument("checkpoint_dir", help="nanochat checkpoint directory, e.g. ~/.cache/nanochat/base_checkpoints/d24")
    n.add_argument("out", help="output run directory; writes OUT/checkpoints/step_<N>/")
    n.add_argument("--step", type=int, default=None, help="step to convert (default: the latest)")
    n.set_defaults(func=_convert_nanochat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
