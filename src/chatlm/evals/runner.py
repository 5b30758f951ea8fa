"""Evaluating a checkpoint: load it once (`load_model`), score it, and write the results where
`chatlm runs` finds them.

- `<eval run>/results.json`: the checkpoint, its step, and every score;
- `<eval run>/run.json`: `evaluated` names the checkpoint, its step and the run it belongs to;
- `<evaluated run>/evals/step_<N>/<eval run name>.json`: a copy beside the training metrics, so the
  evaluated run carries its own scores (`copy_to_run=true`).

What is scored is `cfg.eval.tasks` (conf/eval/): `bpb` (validation shards of the `data` group),
`core` (chatlm.evals.core) and the chat tasks (chatlm.evals.chat). Every task's data is read and
checked before the model is loaded, so missing or corrupt data ends the run with one line and no
results. After each task `results.partial.json` holds what is done so far (`complete: false`);
`results.json` is written only when every task has been scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from chatlm.data.loader import val_sets
from chatlm.data.sources import prepare_sources
from chatlm.evals import chat, core
from chatlm.evals.bpb import ValidationBpb
from chatlm.evals.scoring import batch_tokens
from chatlm.model import select_inference_backend
from chatlm.runtime.model_loading import LoadedModel, load_model, run_dir_of
from chatlm.runtime.rundir import atomic_write_text, now_iso

log = logging.getLogger("chatlm")


def _val_files(cfg: Any, run: Any) -> list:
    return val_sets(prepare_sources(cfg.data, cfg.paths, run.ctx), cfg.data)


def score_bpb(cfg: Any, run: Any, loaded: LoadedModel, val_files: list) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    T = model.dims.sequence_len
    bpb = ValidationBpb(val_files, tok, cfg.hardware.device_batch_size, T, cfg.eval_tokens, cfg.data, run.ctx)
    value = bpb(model)
    log.info(
        "val bpb %.4f (%d tokens on this rank, batch %d x %d)",
        value,
        bpb.tokens_scored,
        cfg.hardware.device_batch_size,
        T,
    )
    return {"val_bpb": value, "val_tokens_per_rank": bpb.tokens_scored}


def _prepare(cfg: Any, run: Any) -> dict[str, Any]:
    """Each task's data, loaded and checked up front (a missing fetch fails here, not after hours)."""
    suite = cfg.eval
    prepared: dict[str, Any] = {}
    for task in suite.tasks:
        if task == "core":
            prepared[task] = core.prepare_core(suite.core_bundle or Path(suite.data_dir) / "core", suite.core_tasks)
        elif task == "bpb":
            prepared[task] = _val_files(cfg, run)
        else:
            prepared[task] = chat.prepare_task(task, suite.data_dir, suite.max_examples)
    return prepared


def score_task(cfg: Any, run: Any, loaded: LoadedModel, task: str, data: Any) -> tuple[dict, dict]:
    """(flat scores for metrics.jsonl and runs ls, details for results.json) of one task."""
    suite, model, tok = cfg.eval, loaded.model, loaded.tokenizer
    tokens = batch_tokens(suite.max_batch_tokens, run.ctx.device)
    if task == "bpb":
        scores = score_bpb(cfg, run, loaded, data)
        return scores, dict(scores)
    if task == "core":
        summary, results = core.evaluate_core(model, tok, data, suite.max_examples, suite.batch_size, tokens, run.ctx)
        flat = core.flat_scores(summary, results)
        key = "core" if "core" in summary else "core_partial"
        log.info(
            "%s %.4f over %d of %d tasks%s",
            key,
            summary[key],
            len(results),
            len(core.CORE_LABELS),
            f" (missing: {', '.join(summary['core_missing'])})" if summary["core_missing"] else "",
        )
        return flat, {**summary, "tasks": {r.label: r.summary() for r in results}}
    result = chat.evaluate_task(model, tok, task, data, suite, cfg.seed, tokens, run.ctx)
    return {task: result.accuracy}, result.summary()


def _suite_record(suite: Any) -> dict:
    keys = ("name", "tasks", "core_tasks", "max_examples", "max_new_tokens", "temperature", "top_k", "num_samples")
    return {k: getattr(suite, k) for k in keys}


def write_partial(run: Any, evaluated: dict, scores: dict, details: dict, suite: Any) -> None:
    """What is scored so far, marked incomplete (an interrupted evaluation keeps its finished tasks)."""
    record = {"complete": False, "evaluated": evaluated, "suite": _suite_record(suite), "scores": scores}
    record["details"] = details
    atomic_write_text(run.path / "results.partial.json", json.dumps(record, indent=2, default=str) + "\n")


def write_results(cfg: Any, run: Any, evaluated: dict, scores: dict, details: Optional[dict] = None) -> Path:
    """results.json in the eval run and, with copy_to_run, in the evaluated run's evals/step_<N>/."""
    results = {
        "complete": True,
        "evaluated": evaluated,
        "suite": _suite_record(cfg.eval),
        "scores": scores,
        "details": details or {},
        "time": now_iso(),
        "eval_run": str(run.path),
    }
    text = json.dumps(results, indent=2, default=str) + "\n"
    atomic_write_text(run.path / "results.json", text)
    copy = Path(evaluated["run_dir"]) / "evals" / f"step_{evaluated['step']:06d}" / f"{run.path.name}.json"
    if cfg.copy_to_run:
        try:
            atomic_write_text(copy, text)
            log.info("results: %s (copy in %s)", run.path / "results.json", copy)
        except OSError as e:  # a read-only run directory (someone else's checkpoint) keeps only the eval run's copy
            log.warning("could not write %s (%s); the results are in %s", copy, e, run.path / "results.json")
    return run.path / "results.json"


def evaluate(cfg: Any, run: Any) -> dict:
    """The eval stage's body: check the task data, load the checkpoint, score each task, record
    and write the results."""
    ctx, suite = run.ctx, cfg.eval
    prepared = _prepare(cfg, run)
    backend = select_inference_backend(ctx.device, run.policy.compute_dtype)  # shapes change batch to batch
    loaded = load_model(
        cfg.ckpt, device=ctx.device, dtype=run.policy.compute_dtype, tokenizer_dir=cfg.tokenizer_dir, backend=backend
    )
    checkpoint = Path(loaded.meta["checkpoint"])
    evaluated = {
        "checkpoint": str(checkpoint),
        "step": int(loaded.meta["step"]),
        "run_dir": str(run_dir_of(checkpoint)),
        "tokenizer": loaded.tokenizer.identity(),
    }
    log.info(
        "evaluating %s (step %d, %s): %s%s",
        checkpoint,
        evaluated["step"],
        loaded.tokenizer.name,
        ", ".join(suite.tasks),
        f", {suite.max_examples} examples per task" if suite.max_examples > 0 else "",
    )
    run.update_record(evaluated=evaluated)
    run.record_derived(evaluated_checkpoint=str(checkpoint), evaluated_step=evaluated["step"])
    scores: dict = {}
    details: dict = {}
    for task in suite.tasks:
        flat, detail = score_task(cfg, run, loaded, task, prepared.get(task))
        scores.update(flat)
        details[task] = detail
        if ctx.is_main:
            write_partial(run, evaluated, scores, details, suite)
    value = chat.chatcore({t: scores[t] for t in chat.CHATCORE_TASKS if t in scores}, complete=suite.max_examples < 0)
    if value is not None:
        scores["chatcore"] = value
    run.log_metrics(step=evaluated["step"], **scores)
    if ctx.is_main:
        write_results(cfg, run, evaluated, scores, details)
        (run.path / "results.partial.json").unlink(missing_ok=True)
    return {"step": evaluated["step"], **scores}
