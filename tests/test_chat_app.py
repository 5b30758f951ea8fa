"""`python -m chatlm.chat` on a real (tiny) pretrained checkpoint: one-shot answers equal greedy
decoding, the interactive loop keeps a token-level history, /clear and /exit, and bad input."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from chatlm.chat import compose_config, parse_argv, run_chat


def chat(args, env, cwd, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "chatlm.chat", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def loaded(smoke_train_run):
    from chatlm.runtime.model_loading import load_model

    run, _, _ = smoke_train_run
    return load_model(run, "cpu")


def greedy_text(loaded, ids, n, stop):
    from chatlm.engine import generate

    return loaded.tokenizer.decode(generate(loaded.model, [ids], n, stop_ids=stop)[0])


def test_one_prompt_is_the_greedy_continuation(smoke_train_run, loaded):
    run, env, root = smoke_train_run
    r = chat([f"ckpt={run}", "-p", "The capital of France is", "temperature=0", "max_tokens=12"], env, root)
    assert r.returncode == 0, r.stderr
    tok = loaded.tokenizer
    want = greedy_text(loaded, [tok.bos_id, *tok.encode("The capital of France is")], 12, [tok.bos_id])
    assert r.stdout == want + "\n"  # base checkpoint: plain completion, and nothing else printed


def test_interactive_chat_keeps_history_clear_and_exit(smoke_train_run, loaded):
    run, env, root = smoke_train_run
    script = "hello there\n/bogus\nand again\n/clear\nhi\n/exit\n"
    r = chat([f"ckpt={run}", "mode=chat", "temperature=0", "max_tokens=6"], env, root, stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant: ") == 3 and "(new conversation)" in r.stdout
    assert "unknown command /bogus" in r.stdout

    # the same conversation in-process: the second answer continues the first turn's tokens
    tok = loaded.tokenizer
    cfg = compose_config([f"ckpt={run}", "mode=chat", "temperature=0", "max_tokens=6"])
    from chatlm.chat import build_session

    session, _ = build_session(cfg)
    lines = iter(["hello there", "and again", "/exit"])
    out = io.StringIO()
    assert run_chat(cfg, read=lambda _: next(lines), out=out, session=session) == 0
    sp = tok.encode_special
    first = [sp("<|user_start|>"), *tok.encode("hello there"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert session.turns[0][: len(first)] == first and session.turns[0][-1] == sp("<|assistant_end|>")
    second = [sp("<|user_start|>"), *tok.encode("and again"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    want = greedy_text(loaded, [tok.bos_id, *session.turns[0], *second], 6, [sp("<|assistant_end|>"), tok.bos_id])
    assert out.getvalue().split("Assistant: ")[2].split("\n")[0] == want
    session.clear()
    assert session.turns == []


def test_seeded_answers_repeat(smoke_train_run):
    run, env, root = smoke_train_run
    args = [f"ckpt={run}", "-p", "Once upon", "temperature=1.0", "top_k=20", "seed=3", "max_tokens=10"]
    a, b = chat(args, env, root), chat(args, env, root)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_bad_input_is_one_line(smoke_train_run):
    run, env, root = smoke_train_run
    for args, needle in [
        (["-p"], "-p needs the prompt text"),
        ([f"ckpt={run}", "top_p=0"], "top_p: must be in (0, 1]"),
        ([f"ckpt={run}", "max_tokens=0"], "max_tokens"),
        ([f"ckpt={run}", "mode=chatty"], "mode: must be one of"),
        (["ckpt=/no/such/run", "-p", "x"], "no checkpoint at /no/such/run"),
    ]:
        r = chat(args, env, root)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 2


def test_parse_argv_quotes_prompts():
    assert parse_argv(["ckpt=x", "-p", "it's a = b, c"]) == ["ckpt=x", "prompt='it\\'s a = b, c'"]
    cfg = compose_config(parse_argv(["ckpt=x", "-p", "it's a = b, c [d]"]))
    assert cfg.prompt == "it's a = b, c [d]" and cfg.temperature == 0.6 and cfg.top_k == 50
