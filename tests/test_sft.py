"""`python -m chatlm.sft` end to end on CPU: a tiny pretrained checkpoint fine-tuned on generated
conversations. The run contract, lineage, learning, exact resume, sweeps, in-training chat evals
and bad input, each through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, load_record, losses, run_dirs, stage_env

FIXTURE_EVALS = REPO / "tests" / "fixtures" / "evals"
# a small generated mixture: fast to build, and every source's data ships with chatlm
SMALL = [
    "mixture=generated",
    "mixture.sources.identity.size=120",
    "mixture.sources.spelling.size=120",
    "mixture.sources.arithmetic.size=120",
    "mixture.val_fraction=0.1",
    "hardware=cpu",
    "precision=fp32",
    "sample_every=-1",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 5-step smoke pretraining run and an environment whose cache has its tokenizer and a word list."""
    root = tmp_path_factory.mktemp("sft_base")
    env = stage_env(root)
    words = Path(env["CHATLM_CACHE_DIR"]) / "evals" / "chat"
    words.mkdir(parents=True)
    import random

    rng = random.Random(0)
    made_up = {"".join(rng.choice("abcdeilmnoprstu") for _ in range(rng.randint(3, 9))) for _ in range(3000)}
    (words / "words.txt").write_text("\n".join(sorted(made_up)) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "chatlm.train", "debug=smoke", "eval_tokens=1024"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = run_dirs(root / "outputs", "train")
    return run, env


def sft(tmp_path, env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "chatlm.sft", *args],
        cwd=tmp_path,
        env={**env, "CHATLM_OUTPUT_ROOT": str(tmp_path / "outputs")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def identity_accuracy(ckpt: Path, questions: list[str]) -> float:
    """Fraction of the questions whose greedy reply names the model (the packaged identity)."""
    from chatlm.engine.generate import chat_replies
    from chatlm.runtime.model_loading import load_model

    loaded = load_model(ckpt, "cpu")
    replies = chat_replies(loaded.model, loaded.tokenizer, questions, max_new_tokens=24)
    return sum("chatlm" in r for r in replies) / len(replies)


def test_sft_trains_records_lineage_and_learns_identity(tmp_path, base):
    run, env = base
    args = [*SMALL, "~mixture.sources.spelling", "~mixture.sources.arithmetic", "mixture.sources.identity.size=300"]
    r = sft(tmp_path, env, f"init_from={run}", *args, "steps=30", "eval_every=10")
    assert r.returncode == 0, r.stderr[-3000:]
    (d,) = run_dirs(tmp_path / "outputs", "sft")
    rec = load_record(d)
    assert rec["status"] == "completed" and rec["stage"] == "sft"
    # lineage: tokenizer -> the base checkpoint, in run.json and in the checkpoint's meta
    chain = rec["lineage"]
    assert [link["stage"] for link in chain] == ["tokenizer", "train"]
    assert chain[1]["checkpoint"] == str(run / "checkpoints" / "step_000005") and chain[1]["step"] == 5
    assert chain[1]["config_hash"] == load_record(run)["config_hash"]
    meta = json.loads((d / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["stage"] == "sft" and meta["lineage"] == chain and meta["init_from"] == chain[1]["checkpoint"]
    assert rec["sft"]["optimizer"].startswith("loaded from") and rec["sft"]["mixture"] == "generated"
    show = subprocess.run(
        [sys.executable, "-m", "chatlm.cli", "runs", "show", str(d)], capture_output=True, text=True, env=env
    )
    assert "tokenizer bpe8k" in show.stdout and f"-> train {chain[1]['checkpoint']}" in show.stdout
    assert "-> sft (this run)" in show.stdout
    # the masked loss falls and the held-out conversations' bpb with it
    vals = [m["val_bpb"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in m]
    assert len(vals) == 4 and vals[-1] < 0.5 * vals[0], vals
    steps = losses(d)
    assert steps[30] < 0.5 * steps[1]
    # and the model now says who it is, where the base model never did
    questions = ["What is your name?", "Who are you?", "Who made you?", "Introduce yourself."]
    assert identity_accuracy(run, questions) == 0.0
    assert identity_accuracy(d, questions) >= 0.75
    # padding waste and sizes are reported
    derived = (d / "config.resolved.yaml").read_text()
    assert "padding_fraction" in derived and "mixture_sizes" in derived


def test_sft_resume_drill_equals_the_uninterrupted_run(tmp_path, base):
    run, env = base
    args = [f"init_from={run}", *SMALL, "steps=8", "eval_every=4"]
    ref = sft(tmp_path, env, *args, f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = sft(tmp_path, env, *args, "stop_at_step=3", f"hydra.run.dir={tmp_path}/cut")
    assert cut.returncode != 0 and load_record(tmp_path / "cut")["status"] == "preempted"
    again = sft(tmp_path, env, *args, "stop_at_step=3", f"hydra.run.dir={tmp_path}/cut")
    assert again.returncode == 0, again.stderr[-3000:]
    rec = load_record(tmp_path / "cut")
    assert [a["status"] for a in rec["attempts"]] == ["preempted", "completed"]
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")  # bitwise
    assert rec["final_metrics"]["val_bpb"] == load_record(tmp_path / "ref")["final_metrics"]["val_bpb"]
    # the resumed run kept the optimizer record of its first attempt
    assert rec["sft"]["optimizer"] == load_record(tmp_path / "ref")["sft"]["optimizer"]


def test_sft_sweep_and_chat_evals_in_the_loop(tmp_path, base):
    run, env = base
    r = sft(
        tmp_path,
        env,
        "-m",
        f"init_from={run}",
        *SMALL,
        "~mixture.sources.spelling",  # the fixture evals' 20 words are all SpellingBee's
        "steps=2",
        "seed=0,1",
        "chat_metric_every=2",
        "chat_eval.tasks=[arc_easy,spelling_bee]",
        "chat_eval.max_examples=3",
        "chat_eval.max_new_tokens=8",
        f"chat_eval.data_dir={FIXTURE_EVALS}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "sft").glob("*/*")
    import csv

    rows = list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))
    assert len(rows) == 2 and "arc_easy" in rows[0] and "val_bpb" in rows[0]
    for values in rows:
        assert values["status"] == "completed" and 0.0 <= float(values["arc_easy"]) <= 1.0
    dirs = sorted(p.parent for p in sweep.glob("*/run.json"))
    scored = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert any("spelling_bee" in m and m["step"] == 2 for m in scored)


@pytest.mark.parametrize(
    "args, key, message",
    [
        (["init_from=/nowhere/at/all"], "init_from", "/nowhere/at/all"),
        ([], "init_from", "say which model to fine-tune"),
        (["mixture.sources.identity.epochs=0"], "mixture.sources.identity.epochs", "must be > 0"),
        (
            ["~mixture.sources.identity", "~mixture.sources.spelling", "~mixture.sources.arithmetic"],
            "mixture.sources",
            "the mixture is empty",
        ),
        (
            ["mixture.sources.identity.kind=jsonl", "mixture.sources.identity.path=/data/evals/chat/gsm8k.jsonl"],
            "mixture.sources.identity.path",
            "never training sources",
        ),
        (["mixture.sources.identity.size=abc"], "mixture.sources.identity.size", "abc"),
    ],
)
def test_sft_bad_input_is_one_line(tmp_path, base, args, key, message):
    run, env = base
    full = [*SMALL, *args] if args and args[0].startswith("init_from") else [f"init_from={run}", *SMALL, *args]
    if not args:
        full = SMALL
    r = sft(tmp_path, env, *full)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("chatlm sft:")]
    assert lines and key in lines[0] and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_sft_refuses_a_checkpoint_with_another_tokenizer(tmp_path, base):
    run, env = base
    other = tmp_path / "other_tok"
    shutil.copytree(run / "tokenizer", other) if (run / "tokenizer").is_dir() else None
    from chatlm.config import TokenizerConfig
    from chatlm.tokenizer import train_tokenizer
    from tests.tokenizer.conftest import make_corpus

    train_tokenizer(make_corpus(), TokenizerConfig(name="bpe8k", vocab_size=512)).save(other)
    r = sft(tmp_path, env, f"init_from={run}", f"tokenizer_dir={other}", *SMALL)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tokenizer" in r.stderr.splitlines()[-1] or "tokenizer" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_sft_schedule_is_nanochats(compose):
    """chat_sft: LR x init_lr_frac, flat for the first half, linear to 0; Muon momentum 0.85 -> 0.95
    over 300 steps, then 0.95 to the end (no pretraining ramp to 0.97 nor warmdown to 0.90)."""
    from chatlm.hydra.app import to_typed
    from chatlm.training.build import TrainingSchedule

    cfg = to_typed(compose("sft", ["init_from=/some/run"]))
    schedule = TrainingSchedule(cfg.schedule, cfg.optim, None, lr_scale=cfg.init_lr_frac)
    hp = [schedule(step, 1000) for step in range(1000)]
    assert [h.lr_multiplier for h in hp[:501]] == [0.8] * 501
    assert hp[750].lr_multiplier == pytest.approx(0.4) and hp[999].lr_multiplier == pytest.approx(0.8 / 500)
    assert hp[0].muon_momentum == pytest.approx(0.85) and hp[150].muon_momentum == pytest.approx(0.90)
    assert all(h.muon_momentum == pytest.approx(0.95) for h in hp[300:])
    assert all(h.muon_weight_decay is None for h in hp)  # no WD schedule: the groups keep theirs
