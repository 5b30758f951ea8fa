"""Evaluating a checkpoint: load it once (`load_model`), score it, and write the results where
`chatlm runs` finds them.

- `<eval run>/results.json`: the checkpoint, its step, and every score;
- `<eval run>/run.json`: `evaluated` names the checkpoint, its step and the run it belongs to;
- `<evaluated run>/evals/step_<N>/<eval run name>.json`: a copy beside the training metrics, so the
  evaluated run carries its own scores (`copy_to_run=true`).

Today the scores are bits per byte on the validation shards of the `data` group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from chatlm.data.loader import val_sets
from chatlm.data.sources import prepare_sources
from chatlm.evals.bpb import ValidationBpb
from chatlm.runtime.model_loading import LoadedModel, load_model, run_dir_of
from chatlm.runtime.rundir import atomic_write_text, now_iso

log = logging.getLogger("chatlm")


def _val_files(cfg: Any, run: Any) -> list:
    return val_sets(prepare_sources(cfg.data, cfg.paths, run.ctx), cfg.data)


def score_bpb(cfg: Any, run: Any, loaded: LoadedModel) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    T = model.dims.sequence_len
    bpb = ValidationBpb(
        _val_files(cfg, run), tok, cfg.hardware.device_batch_size, T, cfg.eval_tokens, cfg.data, run.ctx
    )
    value = bpb(model)
    log.info(
        "val bpb %.4f (%d tokens on this rank, batch %d x %d)",
        value,
        bpb.tokens_scored,
        cfg.hardware.device_batch_size,
        T,
    )
    return {"val_bpb": value, "val_tokens_per_rank": bpb.tokens_scored}


def write_results(cfg: Any, run: Any, evaluated: dict, scores: dict) -> Path:
    """results.json in the eval run and, with copy_to_run, in the evaluated run's evals/step_<N>/."""
    results = {"evaluated": evaluated, "scores": scores, "time": now_iso(), "eval_run": str(run.path)}
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
    """The eval stage's body: load the checkpoint, score it, record and write the results."""
    ctx = run.ctx
    loaded = load_model(cfg.ckpt, device=ctx.device, dtype=run.policy.compute_dtype, tokenizer_dir=cfg.tokenizer_dir)
    checkpoint = Path(loaded.meta["checkpoint"])
    evaluated = {
        "checkpoint": str(checkpoint),
        "step": int(loaded.meta["step"]),
        "run_dir": str(run_dir_of(checkpoint)),
        "tokenizer": loaded.tokenizer.identity(),
    }
    log.info("evaluating %s (step %d, %s)", checkpoint, evaluated["step"], loaded.tokenizer.name)
    run.update_record(evaluated=evaluated)
    run.record_derived(evaluated_checkpoint=str(checkpoint), evaluated_step=evaluated["step"])
    scores = score_bpb(cfg, run, loaded)
    run.log_metrics(step=evaluated["step"], **scores)
    if ctx.is_main:
        write_results(cfg, run, evaluated, scores)
    return {"step": evaluated["step"], **scores}
