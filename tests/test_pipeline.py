"""Pipelines (`chatlm pipeline run`) and the report card (`chatlm report`): the pipeline file's
checks, argument substitution, and a shrunken quickstart end to end through the real commands
(every stage, the same hand-offs, setup fetching from a local package index), re-run to skip
what completed and to resume what did not."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatlm.errors import UsageError
from chatlm.pipeline.runner import _resolve_args, _setup_args
from chatlm.pipeline.spec import Stage, load_pipeline, parse_vars, substitute
from tests.conftest import REPO, load_record, stage_env

QUICKSTART = REPO / "conf" / "pipeline" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_the_shipped_pipelines_load():
    for path in sorted((REPO / "conf" / "pipeline").glob("*.yaml")):
        p = load_pipeline(path)
        assert p.stages and all(s.app for s in p.stages), path
    q = load_pipeline(QUICKSTART)
    assert [s.name for s in q.stages] == [
        "tokenizer",
        "base",
        "base_eval",
        "core",
        "sft",
        "chat_eval",
        "rl",
        "sample",
    ]
    assert q.stage("rl").optional and q.stage("sft").without == {"sft_data": ["mixture=generated"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\n", "non-empty 'stages'"),
        ("stages: [{name: a, app: bake}]\n", "app must be one of"),
        ("stages: [{name: a, app: train}, {name: a, app: eval}]\n", "unique identifier"),
        ("stages: [{name: a, app: train, needs: [data]}]\n", "needs ['data'], which no setup entry provides"),
        ("vars: {a: 1}\nstages: [{name: a, app: train}]\n", "names of stages"),
        ("stages: [{name: a, app: train, args: x}]\n", "must be a list of strings"),
        ("stages: [{name: a\n", "cannot read the pipeline"),
    ],
)
def test_bad_pipeline_files_are_one_line(tmp_path, text, message):
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        load_pipeline(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_substitution_vars_stage_dirs_and_alternatives(tmp_path):
    p = load_pipeline(
        write(tmp_path, "vars: {over: 'a=1 b=[x,y]', prompt: 'hi there'}\nstages: [{name: s, app: chat}]\n")
    )
    values = {**parse_vars(["prompt=why?"], p), "sft": "/runs/sft"}
    stage = Stage("t", "eval", [])
    args = ["ckpt={{rl|sft}}", "{{over}}", "-p", "{{prompt}}"]
    assert _resolve_args(stage, args, values, values) == ["ckpt=/runs/sft", "a=1", "b=[x,y]", "-p", "why?"]
    assert substitute("{{rl|sft}}", {**values, "rl": "/runs/rl"}, "x") == "/runs/rl"
    with pytest.raises(UsageError, match="names no var and no earlier stage"):
        substitute("init_from={{base}}", values, "stage sft")
    with pytest.raises(UsageError, match="no such var"):
        parse_vars(["nope=1"], p)
    assert _setup_args(["chatlm", "fetch", "evals", "{{extra}}"], {"extra": ""}) == ["chatlm", "fetch", "evals"]
    assert _setup_args(["chatlm", "{{extra}}"], {"extra": "--index-url http://x/simple"})[1:] == [
        "--index-url",
        "http://x/simple",
    ]


# ----------------------------------------------------------------------------------------------
# the quickstart, shrunken


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from tests.data.test_fetch_sft import build_archives
    from tests.package_index import Index

    server = Index(build_archives(tmp_path_factory.mktemp("packages")))
    yield server
    server.close()


TINY = [
    "--var",
    "base_args=debug=smoke eval_tokens=1024",
    "--var",
    "core_args=eval.max_examples=3 eval.core_tasks=[arc_easy]",
    "--var",
    "sft_args=steps=4 eval_every=2 sample_every=-1 hardware=cpu precision=fp32 mixture=offline "
    "mixture.sources.spelling.size=60 mixture.sources.arithmetic.size=60 mixture.sources.identity.size=60",
    "--var",
    "chat_eval_args=eval.tasks=[arc_easy,spelling_bee] eval.max_examples=3 eval.max_new_tokens=16",
    "--var",
    "rl_args=rl_task=arithmetic steps=2 rl.top_k=0 rl.num_samples=2 rl.examples_per_step=2 rl.max_new_tokens=8 "
    "rl.eval_examples=2 rl.pass_k=2 hardware=cpu precision=fp32",
    "--with",
    "rl",
]


def pipeline(tmp_path, env, *args, timeout=900):
    cmd = [sys.executable, "-m", "chatlm.cli", "pipeline", "run", "quickstart", "--dir", str(tmp_path / "qs"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_shrunken_quickstart_end_to_end_then_skips_and_resumes(tmp_path, index):
    env = stage_env(tmp_path)
    env.update(PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    fetch = ["--var", f"fetch_args=--index-url {index.url}"]
    r = pipeline(tmp_path, env, *TINY, *fetch)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "qs"
    record = json.loads((d / "pipeline.json").read_text())
    status = {e["name"]: e["status"] for e in record["stages"]}
    assert status == {
        "tokenizer": "completed",
        "base": "completed",
        "base_eval": "completed",
        "core": "completed",
        "sft": "completed",
        "chat_eval": "completed",
        "rl": "completed",
        "sample": "completed",
    }
    assert [s["status"] for s in record["setup"]] == ["completed", "completed"]
    for name in ("tokenizer", "base", "base_eval", "core", "sft", "chat_eval", "rl"):
        assert load_record(d / name)["status"] == "completed", name
    # the hand-offs: each stage read the previous one's run directory
    assert load_record(d / "sft")["lineage"][-1]["run_dir"] == str(d / "base")
    chain = load_record(d / "rl")["lineage"]
    assert [link["stage"] for link in chain] == ["tokenizer", "train", "sft"] and chain[-1]["run_dir"] == str(d / "sft")
    assert "ckpt=" + str(d / "rl") in json.loads((d / "pipeline.json").read_text())["stages"][-1]["command"]
    assert json.loads((d / "chat_eval" / "results.json").read_text())["evaluated"]["run_dir"] == str(d / "sft")
    sample = (d / "sample.txt").read_text().strip()
    assert sample, "the final chat answer is empty"
    report = (d / "report.md").read_text()
    for section in ("# chatlm report: quickstart", "## Summary", "## The final model", "## Stages", "### sft (sft)"):
        assert section in report, section
    assert "| core | eval | completed |" in report and "core_partial" in report
    assert "![base curves](base_curves.png)" in report and (d / "base_curves.png").stat().st_size > 1000
    assert f"python -m chatlm.serve ckpt={d / 'rl'}" in report and "-> rl " in report
    assert "chatlm report" not in r.stderr and "Traceback" not in r.stderr

    # the same command again: every stage is done, nothing runs
    again = pipeline(tmp_path, env, *TINY, *fetch)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier") == 8 and "python -m chatlm.train" not in again.stdout.split("stages:")[0]

    # a changed stage config is refused rather than silently overwritten
    changed = pipeline(tmp_path, env, *TINY, "--var", "chat_eval_args=eval.tasks=[arc_easy] eval.max_examples=2")
    assert changed.returncode == 2 and "chat_eval completed earlier" in changed.stderr

    # an interrupted SFT resumes in its directory, and the stages after it run again
    import shutil

    shutil.rmtree(d / "chat_eval")
    rec = load_record(d / "sft")
    rec["status"] = "preempted"
    (d / "sft" / "run.json").write_text(json.dumps(rec))
    resumed = pipeline(tmp_path, env, *TINY, *fetch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "== [5/8] sft: python -m chatlm.sft" in resumed.stdout and "== [6/8] chat_eval" in resumed.stdout
    assert [a["status"] for a in load_record(d / "sft")["attempts"]][-1] == "completed"


def test_report_of_one_run_and_bad_dirs(tmp_path, smoke_train_run):
    run, env, _ = smoke_train_run
    r = subprocess.run(
        [sys.executable, "-m", "chatlm.cli", "report", str(run)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "| train | train | completed |" in r.stdout and "val_bpb" in r.stdout
    assert (run / "report.md").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "chatlm.cli", "report", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "neither a pipeline directory" in bad.stderr and "Traceback" not in bad.stderr


def test_sigterm_to_the_pipeline_checkpoints_the_stage_and_a_rerun_resumes(tmp_path):
    """What Slurm's time-limit signal does to `chatlm pipeline run` (launch/slurm/speedrun.sbatch):
    the running stage gets the signal, checkpoints and stops as preempted; the same command resumes it."""
    import signal
    import time

    spec = write(
        tmp_path,
        "name: one\nstages:\n  - name: base\n    app: train\n"
        "    args: [debug=smoke, eval_tokens=1024, steps=400, eval_every=-1]\n",
    )
    env = stage_env(tmp_path)
    cmd = [sys.executable, "-m", "chatlm.cli", "pipeline", "run", str(spec), "--dir", str(tmp_path / "p")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "p" / "base" / "metrics.jsonl"
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (metrics.exists() and metrics.read_text().count("\n") >= 3)
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and "stopped with a checkpoint" in err, err[-2000:]
    record = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert record["stages"][0]["status"] == "preempted"
    assert load_record(tmp_path / "p" / "base")["status"] == "preempted"
    assert (tmp_path / "p" / "base" / "checkpoints" / "latest").exists()
