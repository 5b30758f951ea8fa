"""`python -m chatlm.eval`: the eval-shaped stage (no optimizer, no training data): compose,
load_model, score, write a run directory and a copy into the evaluated run."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from chatlm import config as C
from tests.conftest import load_record, run_dirs, stage_env
from tests.test_model_loading import LEGACY, legacy_copy


@pytest.fixture
def trained(smoke_train_run, tmp_path):
    """A copy of the shared smoke run (the eval writes into the evaluated run's evals/)."""
    import shutil

    run, env, root = smoke_train_run
    copy = tmp_path / "outputs" / "train" / "2026-01-01" / run.name
    shutil.copytree(run, copy, symlinks=True)
    return copy, stage_env(tmp_path, CHATLM_CACHE_DIR=env["CHATLM_CACHE_DIR"]), tmp_path


def run_eval(root, env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "chatlm.eval", *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_eval_config_has_no_optimizer_or_model():
    fields = {f.name for f in dataclasses.fields(C.EvalConfig)}
    assert {"ckpt", "data", "eval_tokens", "hardware", "paths", "logger"} <= fields
    assert not fields & {"optim", "schedule", "model", "tokenizer", "steps"}


def test_eval_scores_the_checkpoint_as_training_did(trained):
    run, env, root = trained
    train_bpb = load_record(run)["final_metrics"]["val_bpb"]
    # the same tokens as the run's final validation (smoke: batch 4 x 128, eval_tokens 1024)
    r = run_eval(root, env, f"ckpt={run}", "eval_tokens=1024", "hardware=cpu", "hardware.device_batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = run_dirs(root / "outputs", "eval")
    rec = load_record(ev)
    assert rec["status"] == "completed" and rec["stage"] == "eval"
    assert rec["evaluated"]["step"] == 5 and rec["evaluated"]["checkpoint"].endswith("checkpoints/step_000005")
    assert rec["final_metrics"]["val_bpb"] == pytest.approx(train_bpb, abs=1e-9) and math.isfinite(train_bpb)
    results = json.loads((ev / "results.json").read_text())
    assert results["scores"]["val_bpb"] == rec["final_metrics"]["val_bpb"]
    copy = run / "evals" / "step_000005" / f"{ev.name}.json"
    assert json.loads(copy.read_text()) == results


def test_eval_of_a_legacy_checkpoint_with_its_tokenizer(tmp_path):
    env = stage_env(tmp_path)
    data = f"data.sources.0.path={LEGACY / 'data'}"
    r = run_eval(
        tmp_path,
        env,
        f"ckpt={LEGACY / 'run'}",
        f"tokenizer_dir={LEGACY / 'tokenizer' / 'bpe300'}",
        "data.sources.0.kind=local",
        data,
        "eval_tokens=256",
        "hardware=cpu",
        "copy_to_run=false",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = run_dirs(tmp_path / "outputs", "eval")
    assert 0 < load_record(ev)["final_metrics"]["val_bpb"] < 20


@pytest.mark.parametrize(
    "args, code, text",
    [
        ([], 2, "config error: ckpt: say what to evaluate"),
        (["ckpt=does/not/exist"], 1, "no checkpoint at does/not/exist: the path does not exist"),
        (["ckpt=LEGACY"], 1, "pass tokenizer_dir="),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, code, text):
    legacy = legacy_copy(tmp_path, tmp_path / "gone")  # its tokenizer is not where its run says
    args = [a.replace("LEGACY", str(legacy)) for a in args]
    r = run_eval(tmp_path, stage_env(tmp_path), *args, "hardware=cpu")
    assert r.returncode == code and text in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


EVAL_FIXTURES = LEGACY.parent / "evals"


def test_core_and_chat_suites_end_to_end(trained):
    """eval=all on the fixture tasks: every score in results.json, metrics and the evaluated run;
    the chat tasks and CORE through the real stage (a 5-step model scores near chance)."""
    run, env, root = trained
    r = run_eval(
        root,
        env,
        f"ckpt={run}",
        "eval=all",
        f"eval.data_dir={EVAL_FIXTURES}",
        "eval.max_examples=3",
        "eval.max_new_tokens=8",
        "eval_tokens=1024",
        "hardware=cpu",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = run_dirs(root / "outputs", "eval")
    results = json.loads((ev / "results.json").read_text())
    scores = results["scores"]
    assert results["complete"] is True and not (ev / "results.partial.json").exists()
    assert results["suite"]["max_examples"] == 3 and results["suite"]["name"] == "all"
    chat_tasks = {"arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling_bee"}
    assert {"val_bpb", "core_partial", *chat_tasks} <= set(scores)
    assert "core" not in scores and "chatcore" not in scores  # 3 of 22 tasks; 3 examples per task
    assert results["details"]["core"]["core_tasks"] == ["arc_easy", "winogrande", "lambada_openai"]
    assert all(d.get("examples", 3) == 3 for t, d in results["details"].items() if t not in ("bpb", "core"))
    for key in ("arc_easy", "mmlu", "gsm8k"):
        assert 0.0 <= scores[key] <= 1.0
    assert load_record(ev)["final_metrics"]["arc_easy"] == scores["arc_easy"]
    assert json.loads((run / "evals" / "step_000005" / f"{ev.name}.json").read_text())["scores"] == scores
    # the evaluated run shows its eval scores beside its training metrics
    from chatlm.runs.index import RunInfo

    info = RunInfo(run, load_record(run))
    assert info.final_metrics["arc_easy"] == scores["arc_easy"] and "val_bpb" in info.final_metrics
    last = info.metrics()[-1]
    assert {k: last[k] for k in scores} == scores and last["step"] == 5 and last["tokens"] == 5 * 512
    show = subprocess.run(
        [sys.executable, "-m", "chatlm.cli", "runs", "show", str(run)], capture_output=True, text=True, env=env
    )
    assert show.returncode == 0 and "core_partial" in show.stdout and "gsm8k" in show.stdout, show.stdout + show.stderr


@pytest.mark.parametrize(
    "args, text",
    [
        (["eval=gsm8k"], "task gsm8k: "),
        (["eval=core"], "no CORE tasks at "),
    ],
)
def test_unfetched_task_data_is_one_line_naming_the_fetch(trained, args, text):
    run, env, root = trained
    r = run_eval(root, env, f"ckpt={run}", *args, f"eval.data_dir={root / 'empty'}", "hardware=cpu")
    assert r.returncode == 1 and text in r.stderr and "chatlm fetch evals" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (ev,) = run_dirs(root / "outputs", "eval")
    assert not (ev / "results.json").exists() and not (run / "evals").exists()


def test_corrupt_task_file_is_one_line(trained):
    import shutil

    run, env, root = trained
    data = root / "evals"
    shutil.copytree(EVAL_FIXTURES, data)
    (data / "chat" / "mmlu.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}\n{broken\n')
    r = run_eval(root, env, f"ckpt={run}", "eval=mmlu", f"eval.data_dir={data}", "hardware=cpu")
    assert r.returncode == 1 and "mmlu.jsonl:2: not JSON" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bad_suite_values_are_config_errors(tmp_path):
    r = run_eval(tmp_path, stage_env(tmp_path), "ckpt=x", "eval.tasks=[core,hellaswag]", "hardware=cpu")
    assert r.returncode == 2 and "eval.tasks: unknown task(s) ['hellaswag']" in r.stderr, r.stderr[-2000:]
    r = run_eval(tmp_path, stage_env(tmp_path), "ckpt=x", "eval=gsm8k", "eval.num_samples=4", "hardware=cpu")
    assert r.returncode == 2 and "eval.temperature > 0" in r.stderr, r.stderr[-2000:]


def test_core_in_training_and_an_eval_sweep_over_its_checkpoints(tmp_path):
    """core_metric_every runs the eval stage's CORE inside training; `chatlm.eval -m ckpt=A,B`
    scores each checkpoint in its own job, and the final one agrees with what training logged."""
    from tests.conftest import SMOKE, train_once

    env = stage_env(tmp_path)
    bundle = EVAL_FIXTURES / "core"
    run = train_once(
        tmp_path,
        env,
        *SMOKE,
        "save_every=2",
        "core_metric_every=2",
        "core_metric_max_per_task=4",
        f"core_bundle={bundle}",
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    core_rows = {r["step"]: r for r in rows if "core_partial" in r}
    assert sorted(core_rows) == [2, 4, 5]  # every 2 steps and at the end, not at step 0
    assert set(core_rows[5]) >= {"core/arc_easy", "core/winogrande", "core/lambada_openai"}
    assert load_record(run)["final_metrics"]["core_partial"] == core_rows[5]["core_partial"]

    ckpts = ",".join(str(run / "checkpoints" / s) for s in ("step_000002", "step_000005"))
    r = run_eval(
        tmp_path,
        env,
        "-m",
        f"ckpt={ckpts}",
        "eval=core",
        f"eval.core_bundle={bundle}",
        "eval.max_examples=4",
        "hardware=cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    copies = sorted((run / "evals").glob("step_*/*.json"))
    assert [c.parent.name for c in copies] == ["step_000002", "step_000005"]
    final = json.loads(copies[1].read_text())["scores"]
    assert final["core_partial"] == pytest.approx(core_rows[5]["core_partial"], abs=1e-9)
    early = json.loads(copies[0].read_text())["scores"]
    assert early["core_partial"] == pytest.approx(core_rows[2]["core_partial"], abs=1e-9)


def test_chat_evals_in_training_match_the_eval_stage(tmp_path):
    """chat_metric_every scores chat tasks during training with the eval stage's code: the last
    in-training scores equal `chatlm.eval` on the final checkpoint with the same settings."""
    from tests.conftest import SMOKE, train_once

    env = stage_env(tmp_path)
    suite = [f"data_dir={EVAL_FIXTURES}", "max_examples=3", "max_new_tokens=6"]
    run = train_once(
        tmp_path,
        env,
        *SMOKE,
        "chat_metric_every=2",
        "chat_eval.tasks=[arc_easy,mmlu,gsm8k]",
        *(f"chat_eval.{x}" for x in suite),
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    chat_rows = {r["step"]: r for r in rows if "mmlu" in r}
    assert sorted(chat_rows) == [2, 4, 5] and {"arc_easy", "gsm8k"} <= set(chat_rows[5])
    assert load_record(run)["final_metrics"]["mmlu"] == chat_rows[5]["mmlu"]
    r = run_eval(tmp_path, env, f"ckpt={run}", "eval.tasks=[arc_easy,mmlu,gsm8k]", *(f"eval.{x}" for x in suite))
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = run_dirs(tmp_path / "outputs", "eval")
    scores = json.loads((ev / "results.json").read_text())["scores"]
    assert {k: scores[k] for k in ("arc_easy", "mmlu", "gsm8k")} == {
        k: chat_rows[5][k] for k in ("arc_easy", "mmlu", "gsm8k")
    }


def test_chat_eval_in_training_refuses_non_chat_tasks(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "chatlm.train", "debug=smoke", "chat_eval.tasks=[core]"],
        cwd=tmp_path,
        env=stage_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "chat_eval.tasks: ['core'] are not chat tasks" in r.stderr, r.stderr[-2000:]


def test_runs_prefer_a_later_evaluation_of_the_final_checkpoint(tmp_path):
    """runs ls/compare: `chatlm.eval` of the final checkpoint wins over the in-training value of
    the same key; an earlier step's evaluation only adds a curve point, at its step's tokens."""
    from chatlm.runs.index import RunInfo

    run = tmp_path / "run"
    (run / "evals" / "step_001000").mkdir(parents=True)
    (run / "evals" / "step_000500").mkdir(parents=True)
    rows = [{"step": 500, "tokens": 5000, "train_time_s": 50.0}, {"step": 1000, "tokens": 10000, "train_time_s": 99.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def result(step, **scores):
        return json.dumps({"complete": True, "evaluated": {"step": step}, "scores": scores})

    (run / "evals" / "step_001000" / "e.json").write_text(result(1000, core=0.12, mmlu=0.3))
    (run / "evals" / "step_000500" / "e.json").write_text(result(500, core=0.05))
    partial = {"complete": False, "evaluated": {"step": 1000}, "scores": {"core": 0.9}}
    (run / "evals" / "step_001000" / "p.json").write_text(json.dumps(partial))
    info = RunInfo(run, {"final_metrics": {"steps": 1000, "core": 0.10, "val_bpb": 0.9}})
    assert info.final_metrics == {"steps": 1000, "core": 0.12, "mmlu": 0.3, "val_bpb": 0.9}
    evals = [r for r in info.metrics() if "core" in r]
    assert evals == [
        {"step": 500, "tokens": 5000, "train_time_s": 50.0, "core": 0.05},
        {"step": 1000, "tokens": 10000, "train_time_s": 99.0, "core": 0.12, "mmlu": 0.3},
    ]
    stale = RunInfo(run, {"final_metrics": {"steps": 2000, "core": 0.10}})
    assert stale.final_metrics["core"] == 0.10  # no evaluation of step 2000: the run's own value
