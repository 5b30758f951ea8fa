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
