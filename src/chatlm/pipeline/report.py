"""`chatlm report <pipeline dir | run dir>`: the report card at the end of a pipeline (nanochat
printed one at the end of its speedrun), written to `report.md` beside a loss-curve PNG per
training stage, and printed.

Per stage: the command, status, wall time, tokens, final metrics (val bpb, CORE, each chat task,
ChatCORE, RL reward), then the final model's lineage, the hardware, the git commit and the chat
sample, and the commands to talk to the model and to serve it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Optional

from chatlm.errors import UsageError
from chatlm.runtime.lineage import describe
from chatlm.runtime.rundir import read_json

TRAINING = ("train", "sft", "rl")
#: final metrics shown in the summary table, in this order, when a stage has them
HEADLINE = (
    "val_bpb",
    "bpb",
    "core",
    "core_partial",
    "chatcore",
    "arc_easy",
    "arc_challenge",
    "mmlu",
    "gsm8k",
    "humaneval",
    "spelling_bee",
    "reward",
    "pass@1",
    "train_loss",
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def stage_metrics(run_dir: Path, app: str) -> dict[str, Any]:
    """A stage's final numbers: the eval results' scores, or a training run's final metrics."""
    if app == "eval":
        results = read_json(run_dir / "results.json") or {}
        scores = results.get("scores") or {}
        return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    rec = read_json(run_dir / "run.json") or {}
    return {k: v for k, v in (rec.get("final_metrics") or {}).items() if isinstance(v, (int, float))}


def _curves(run_dir: Path, name: str, out_dir: Path) -> Optional[str]:
    """The stage's loss (and validation bpb) curve as <name>_curves.png; None when it has none."""
    from chatlm.runs.index import load_run
    from chatlm.runs.plot import plot_runs

    run = load_run(run_dir, [])
    if run is None:
        return None
    png = out_dir / f"{name}_curves.png"
    drawn = plot_runs([run], ["loss", "val_bpb", "reward"], "step", png, notes=[])
    return png.name if drawn else None


def _stages_of(directory: Path) -> tuple[dict, list[dict]]:
    """(pipeline record, stage entries): a pipeline directory's, or one run directory as one stage."""
    record = read_json(directory / "pipeline.json")
    if record is not None:
        return record, list(record.get("stages") or [])
    rec = read_json(directory / "run.json")
    if rec is None:
        raise UsageError(f"{directory} is neither a pipeline directory (pipeline.json) nor a run directory (run.json)")
    argv = rec.get("argv") or []
    entry = {
        "name": rec.get("stage", "run"),
        "app": rec.get("stage", "train"),
        "status": rec.get("status"),
        "run_dir": str(directory),
        "command": shlex.join(["python", *map(str, argv[1:])]) if argv else "",
        "wall_s": rec.get("duration_s"),
    }
    return {"pipeline": directory.name, "directory": str(directory)}, [entry]


def build_report(directory: Path) -> tuple[str, Path]:
    """Write `<directory>/report.md` (and the curve PNGs); returns (its text, its path)."""
    directory = directory.expanduser().absolute()
    record, entries = _stages_of(directory)
    lines = [f"# chatlm report: {record.get('pipeline')}", ""]
    if record.get("description"):
        lines += [record["description"], ""]
    runs = [(e, Path(e["run_dir"])) for e in entries if e.get("run_dir") and Path(e["run_dir"], "run.json").is_file()]
    first = read_json(runs[0][1] / "run.json") if runs else {}
    first = first or {}
    git = first.get("git") or {}
    versions = first.get("versions") or {}
    hw = first.get("hardware") or {}
    total = sum(e.get("wall_s") or 0 for e in entries if isinstance(e.get("wall_s"), (int, float)))
    lines += [
        f"- directory: `{directory}`",
        f"- started: {record.get('first_started') or first.get('start_time', '')}",
        f"- wall time of the stages: {_duration(total)}"
        + "".join(
            f", setup {x['name']} {_duration(x.get('wall_s'))} ({x.get('status')})" for x in record.get("setup") or []
        ),
        f"- hardware: {_hardware(hw, first)}",
        f"- git: {str(git.get('sha', ''))[:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- versions: chatlm {versions.get('chatlm', '?')}, torch {versions.get('torch', '?')}",
        "",
        "## Summary",
        "",
        "| stage | app | status | wall | tokens | metrics |",
        "|---|---|---|---:|---:|---|",
    ]
    details: list[str] = []
    final_chain: Optional[list] = None
    for e in entries:
        run_dir = Path(e["run_dir"]) if e.get("run_dir") else None
        metrics = stage_metrics(run_dir, e["app"]) if run_dir and run_dir.is_dir() else {}
        shown = [f"{k} {_fmt(metrics[k])}" for k in HEADLINE if k in metrics and k not in ("bpb",)][:6]
        tokens = _fmt(metrics["tokens"]) if "tokens" in metrics else ""
        lines.append(
            f"| {e['name']} | {e['app']} | {e.get('status', '')} | {_duration(e.get('wall_s'))} | {tokens} | "
            f"{', '.join(shown)} |"
        )
        details += [f"### {e['name']} ({e['app']})", ""]
        if e.get("reason"):
            details += [f"{e.get('status')}: {e['reason']}", ""]
        if e.get("command"):
            details += ["```", e["command"], "```", ""]
        if metrics:
            details += ["| metric | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
            details.append("")
        if run_dir is not None and e["app"] in TRAINING and run_dir.is_dir():
            png = _curves(run_dir, e["name"], directory)
            if png:
                details += [f"![{e['name']} curves]({png})", ""]
            rec = read_json(run_dir / "run.json") or {}
            if isinstance(rec.get("lineage"), list) and e.get("status") == "completed":
                final_chain = [*rec["lineage"], {"stage": e["app"], "this": str(run_dir)}]
        if e.get("output") and Path(e["output"]).is_file():
            details += ["```", Path(e["output"]).read_text().strip()[-2000:], "```", ""]
    lines.append("")
    if final_chain:
        last = final_chain.pop()
        lines += ["## The final model", "", "```"]
        chain = describe(final_chain, f"{last['stage']} {last['this']}")
        lines += [chain[0], *(f"  -> {link}" for link in chain[1:]), "```", ""]
        d = shlex.quote(last["this"])
        lines += [
            "Talk to it and serve it:",
            "",
            "```bash",
            f"python -m chatlm.chat ckpt={d}",
            f"python -m chatlm.serve ckpt={d}",
            "```",
            "",
        ]
    lines += ["## Stages", "", *details]
    text = "\n".join(lines).rstrip() + "\n"
    out = directory / "report.md"
    out.write_text(text)
    return text, out


def _hardware(hw: dict, rec: dict) -> str:
    parts = []
    gpus = hw.get("gpus")
    if isinstance(gpus, list) and gpus:
        parts.append(f"{len(gpus)} x {gpus[0]}")
    parts.append(f"{hw.get('cpu_count', '?')} CPU cores")
    parts.append(f"world size {rec.get('world_size', 1)}")
    if hw.get("hostname"):
        parts.append(f"host {hw['hostname']}")
    return ", ".join(parts)


def report_json(directory: Path) -> str:
    """The same content as data (for scripts): stages with their metrics."""
    record, entries = _stages_of(directory.expanduser().absolute())
    for e in entries:
        if e.get("run_dir") and Path(e["run_dir"]).is_dir():
            e["metrics"] = stage_metrics(Path(e["run_dir"]), e["app"])
    return json.dumps({"pipeline": record.get("pipeline"), "stages": entries}, indent=2)
