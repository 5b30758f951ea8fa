"""`python -m chatlm.rl` end to end on CPU, through the real command line: a tiny chat model (the
session's smoke pretraining run, fine-tuned here to answer '#### <digit>') learns from rewards,
resumes bitwise, sweeps, records its lineage, and refuses bad input in one line.

The learning task is deliberately easy, so the test is about the machinery rather than the model:
SFT teaches the answer format with a random digit; RL rewards only '#### 7'. A wrong sign or mask,
an off-policy sample or a dead gradient leaves the reward where it started."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_record, losses, run_dirs

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena")
# the RL run of the learning, resume and lineage tests (seed 42, the default): 12 steps of 8 prompts x 8 samples
RL = [
    "hardware=cpu",
    "hardware.device_batch_size=32",  # two micro-batches per step
    "precision=fp32",
    "rl.examples_per_step=8",
    "rl.num_samples=8",
    "rl.max_new_tokens=8",
    "rl.top_k=0",  # (a full softmax samples several times faster on a CPU than a top-k sort)
    "rl.eval_examples=16",
    "rl.pass_k=4",
    "init_lr_frac=0.4",
    "eval_every=6",
    "sample_every=6",
    "save_every=6",
]


def _questions(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.choice(NAMES)} asks: guess the secret digit." for _ in range(n)]


@pytest.fixture(scope="module")
def chat_model(smoke_train_run, tmp_path_factory):
    """(SFT run that answers '#### <random digit>', env, the RL problems file whose answer is 7)."""
    base, env, _ = smoke_train_run
    root = tmp_path_factory.mktemp("rl")
    rng = random.Random(0)
    sft_data, rl_data = root / "guess_sft.jsonl", root / "guess_rl.jsonl"
    sft_data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"#### {d}"}]})
            + "\n"
            for q, d in zip(_questions(rng, 400), (rng.randint(0, 9) for _ in range(400)))
        )
    )
    rl_data.write_text("".join(json.dumps({"question": q, "answer": "#### 7"}) + "\n" for q in _questions(rng, 200)))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatlm.sft",
            f"init_from={base}",
            "mixture=generated",
            "~mixture.sources.spelling",
            "~mixture.sources.arithmetic",
            "mixture.sources.identity.kind=jsonl",
            f"mixture.sources.identity.path={sft_data}",
            "hardware=cpu",
            "precision=fp32",
            "sample_every=-1",
            "eval_every=-1",
            "steps=30",
        ],
        cwd=root,
        env={**env, "CHATLM_OUTPUT_ROOT": str(root / "outputs")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sft,) = run_dirs(root / "outputs", "sft")
    return sft, env, rl_data


def rl(cwd: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatlm.rl", *args],
        cwd=cwd,
        env={**env, "CHATLM_OUTPUT_ROOT": str(cwd / "outputs")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(run_dir: Path, key: str) -> dict[int, dict]:
    """step -> the metrics.jsonl row holding `key` (a re-done step's last row wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row
    return out


@pytest.fixture(scope="module")
def learned(chat_model, tmp_path_factory):
    """The 12-step RL run every test below compares with."""
    sft, env, problems = chat_model
    cwd = tmp_path_factory.mktemp("rl_ref")
    args = [f"init_from={sft}", "rl_task=jsonl", f"rl_task.path={problems}", *RL, "steps=12"]
    r = rl(cwd, env, *args, f"hydra.run.dir={cwd}/ref")
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "ref", args


def test_mean_reward_rises_over_a_short_cpu_run(learned):
    run, _ = learned
    reward = {step: row["reward"] for step, row in rows(run, "reward").items()}
    assert sorted(reward) == list(range(1, 13))
    first, last = sum(reward[s] for s in (1, 2, 3)) / 3, sum(reward[s] for s in (10, 11, 12)) / 3
    assert first < 0.4 and last > first + 0.3, reward
    passes = rows(run, "pass@1")
    assert sorted(passes) == [0, 6, 12] and passes[12]["pass@1"] > passes[0]["pass@1"] + 0.2, passes
    assert passes[12]["pass@4"] >= passes[12]["pass@1"]
    # what each step logs
    row = rows(run, "reward")[12]
    for key in ("completion_len", "sampling_tok_per_s", "train_tok_per_s", "sampling_s", "train_s", "prompts_per_s"):
        assert row[key] > 0, key
    assert 0 < row["completion_len"] <= 8
    final = load_record(run)["final_metrics"]
    assert final["pass@1"] == passes[12]["pass@1"] and final["reward"] == reward[12]
    assert "reward" in (run / "samples" / "step_000012.txt").read_text()


def test_lineage_meta_and_derived_plan(learned, chat_model, capsys):
    run, _ = learned
    sft, _, _ = chat_model
    rec = load_record(run)
    assert rec["status"] == "completed" and rec["stage"] == "rl"
    chain = rec["lineage"]
    assert [link["stage"] for link in chain] == ["tokenizer", "train", "sft"]
    assert chain[2]["checkpoint"] == str(sft / "checkpoints" / "step_000030") and chain[2]["step"] == 30
    assert rec["rl"]["task"] == "jsonl" and rec["rl"]["source"] == chain[2]
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["stage"] == "rl" and meta["lineage"] == chain and meta["step"] == 12
    from chatlm.cli import main as chatlm_cli

    assert chatlm_cli(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"-> sft {chain[2]['checkpoint']}" in shown and "-> rl (this run)" in shown
    derived = (run / "config.resolved.yaml").read_text()
    assert "micro_batches: 2" in derived and "examples_per_rank: 8" in derived  # 64 rows, 32 per micro-batch
    # an RL checkpoint is a chat model to the chat app
    from chatlm.runtime.model_loading import load_model

    assert load_model(run).meta["stage"] == "rl"


def test_resume_drill_equals_the_uninterrupted_run(learned, chat_model, tmp_path):
    ref, args = learned
    _, env, _ = chat_model
    cut = rl(tmp_path, env, *args, "stop_at_step=5", f"hydra.run.dir={tmp_path}/cut")
    assert cut.returncode != 0 and load_record(tmp_path / "cut")["status"] == "preempted"
    again = rl(tmp_path, env, *args, "stop_at_step=5", f"hydra.run.dir={tmp_path}/cut")
    assert again.returncode == 0, again.stderr[-3000:]
    rec = load_record(tmp_path / "cut")
    assert [a["status"] for a in rec["attempts"]] == ["preempted", "completed"]
    # bitwise: the samples (seeded by step, prompt and sample), their rewards, the losses and pass@k
    assert losses(tmp_path / "cut") == losses(ref)
    for key in ("reward", "pass@1"):
        got = {s: r[key] for s, r in rows(tmp_path / "cut", key).items()}
        want = {s: r[key] for s, r in rows(ref, key).items()}
        assert got == want, key
    assert (
        rows(tmp_path / "cut", "completion_len")[7]["completion_len"]
        == rows(ref, "completion_len")[7]["completion_len"]
    )


def test_sweep_over_num_samples(chat_model, tmp_path):
    sft, env, problems = chat_model
    r = rl(
        tmp_path,
        env,
        "-m",
        f"init_from={sft}",
        "rl_task=jsonl",
        f"rl_task.path={problems}",
        *RL,
        "steps=2",
        "rl.num_samples=2,4",
        "rl.eval_examples=4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "rl").glob("*/*")
    table = list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))
    assert len(table) == 2 and all(row["status"] == "completed" for row in table)
    assert "reward" in table[0] and "pass@1" in table[0]
    assert ["rl.num_samples=2" in table[0]["overrides"], "rl.num_samples=4" in table[1]["overrides"]] == [True, True]
    assert int(table[1]["tokens"]) > int(table[0]["tokens"])  # twice the samples


def _without_chat_tokens(run: Path, dest: Path) -> Path:
    """A copy of `run` whose tokenizer has the same vocabulary but no chat tokens."""
    from chatlm.tokenizer import Tokenizer

    shutil.copytree(run, dest, symlinks=True)
    tok = Tokenizer.load(run / "tokenizer")
    names = ["<|bos|>", *(f"<|reserved_{i}|>" for i in range(len(tok.special_tokens) - 1))]
    shutil.rmtree(dest / "tokenizer")
    Tokenizer(tok.mergeable_ranks, tok.pattern, names, name=tok.name).save(dest / "tokenizer")
    meta_path = dest / "checkpoints" / "latest" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["tokenizer"]  # (checked by vocabulary size only, as checkpoints older than fingerprints)
    meta_path.write_text(json.dumps(meta))
    return dest


BAD = {  # case -> (key, what the one line says)
    "num_samples": ("rl.num_samples", "every advantage is 0"),
    "no_prompts": ("rl_task.path", "no problems"),
    "no_init_from": ("init_from", "say which model to train"),
    "missing_init_from": ("init_from", "/nowhere/at/all"),
    "no_chat_tokens": ("init_from", "<|user_start|>"),
}


def test_bad_input_is_one_line(chat_model, smoke_train_run, tmp_path):
    sft, env, problems = chat_model
    (tmp_path / "empty.jsonl").write_text("")
    args = [f"init_from={sft}", "rl_task=jsonl", f"rl_task.path={problems}", "hardware=cpu", "steps=1"]
    plain = _without_chat_tokens(smoke_train_run[0], tmp_path / "plain")
    cases = {
        "num_samples": [*args, "rl.num_samples=1"],
        "no_prompts": [*args, f"rl_task.path={tmp_path / 'empty.jsonl'}"],
        "no_init_from": args[1:],
        "missing_init_from": ["init_from=/nowhere/at/all", *args[1:]],
        "no_chat_tokens": [f"init_from={plain}", *args[1:]],
    }
    running = {}
    for case, case_args in cases.items():  # all at once: each is mostly interpreter start-up
        cwd = tmp_path / case
        cwd.mkdir()
        running[case] = subprocess.Popen(
            [sys.executable, "-m", "chatlm.rl", *case_args],
            cwd=cwd,
            env={**env, "CHATLM_OUTPUT_ROOT": str(cwd / "outputs")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for case, proc in running.items():
        _, stderr = proc.communicate(timeout=300)
        key, message = BAD[case]
        assert proc.returncode == 2, (case, proc.returncode, stderr[-2000:])
        lines = [line for line in stderr.strip().splitlines() if line.startswith("chatlm rl:")]
        assert lines and key in lines[0] and message in lines[0], (case, stderr[-2000:])
        assert "Traceback" not in stderr, case
