"""Saving a Trainer into a checkpoint and restoring one from it (files: chatlm.runtime.checkpoint).

A checkpoint holds the model, the optimizer's full state (any world size), every rank's loader
position and RNG state, and meta.json: the step and tokens, the loop state (`TrainState`), the
loss scale, and what the stage adds (config hash, model config, vocabulary size, plan, the
tokenizer's record). The first save of a run also copies the tokenizer into `<run>/tokenizer/`, so a
run directory is all `load_model` needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist

from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime.model_loading import RUN_TOKENIZER_DIR, check_architecture, check_tokenizer
from chatlm.training.hooks import Hook
from chatlm.training.state import TrainState
from chatlm.training.trainer import NonFiniteLoss

log = logging.getLogger("chatlm")


def weights_finite(model: Any, ctx: Any) -> bool:
    """Whether every weight is finite on every rank (a collective)."""
    finite = torch.tensor([float(all(bool(p.isfinite().all()) for p in model.parameters()))], device=ctx.device)
    if ctx.distributed:
        tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
    return finite.item() == 1.0


class CheckpointHook(Hook):
    """Checkpoints every `every` steps (never the step a run started at) and at the end.

    `meta` is what the stage records in every meta.json; `tokenizer` is copied into the run
    directory with the first checkpoint; `keep` > 0 keeps only the newest that many."""

    def __init__(
        self, run: Any, *, every: int, meta: dict, tokenizer: Any = None, keep: int = -1, fresh_run: bool = True
    ):
        self.run, self.every, self.meta, self.tokenizer, self.keep = run, every, meta, tokenizer, keep
        self.fresh_run = fresh_run  # a resumed run that is already at its end saves nothing new

    def before_step(self, trainer: Any, last: bool) -> None:
        step = trainer.state.step
        if last:
            if step > trainer.start_step or self.fresh_run:
                self.save(trainer, step)
        elif self.every > 0 and step > trainer.start_step and step % self.every == 0:
            self.save(trainer, step)

    def save(self, trainer: Any, step: int) -> Path:
        """Write `checkpoints/step_<step>` (every rank calls it: the optimizer state is a collective)."""
        ctx = trainer.ctx
        if not weights_finite(trainer.model, ctx):  # never replace the last good checkpoint with inf/nan
            raise NonFiniteLoss(
                f"the weights hold inf/nan at step {step} (an update overflowed); nothing was saved; {self.last_good()}"
            )
        optim_state = trainer.optimizer.full_state_dict()  # collective
        loaders = ctx.all_gather_object(trainer.batches.state_dict(include_last_batch=True))  # the next batch too
        rngs = ctx.all_gather_object(ckpt.capture_rng_state())
        path = ckpt.step_dir(self.run.path, step)
        if ctx.is_main:
            meta = {
                "step": step,
                "world_size": ctx.world_size,
                **self.meta,
                "tokens": trainer.state.tokens,
                "loop": trainer.state.loop_meta(),
                "loss_scale": trainer.scaler.state_dict(),
            }
            path = ckpt.save_checkpoint(
                self.run.path,
                step,
                model_state=trainer.model.state_dict(),
                optim_state=optim_state,
                loader_states=loaders,
                rng_states=rngs,
                meta=meta,
                keep_last=self.keep if self.keep > 0 else None,
            )
            self._copy_tokenizer()
            log.info("checkpoint: %s", path)
        ctx.barrier()
        return path

    def _copy_tokenizer(self) -> None:
        target = self.run.path / RUN_TOKENIZER_DIR
        if self.tokenizer is not None and not (target / "tokenizer.json").exists():
            self.tokenizer.save(target)

    def last_good(self) -> str:
        good = ckpt.latest_checkpoint(self.run.path)
        return f"the last good checkpoint is {good}" if good is not None else "no earlier checkpoint exists"

    def on_failure(self, trainer: Any, error: BaseException) -> Optional[str]:
        """After a non-finite loss: checkpoint the weights if they are still finite."""
        step = trainer.state.step
        if weights_finite(trainer.model, trainer.ctx):
            self.save(trainer, step)
            return f"the weights before this step are finite and saved as checkpoints/{ckpt.step_dir_name(step)}"
        return f"the weights already hold inf/nan (an update overflowed), so nothing was saved; {self.last_good()}"


def restore(trainer: Any, path: Any, *, model_cfg: Any, tokenizer: Any) -> Path:
    """Resume `trainer` exactly from a checkpoint: weights, optimizer, train state, loss scale, and
    on the same number of ranks every rank's loader position and RNG state. On another number of
    ranks the data stream continues after the furthest row group any old rank had read."""
    ctx = trainer.ctx
    state = ckpt.load_checkpoint(path, map_location=ctx.device)
    meta, where = state["meta"], state["path"]
    check_tokenizer(meta, tokenizer, where)
    check_architecture(meta, model_cfg, tokenizer.vocab_size, where)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_full_state_dict(state["optim"])
    trainer.state = TrainState.from_meta(meta, trainer.tokens_per_step)
    trainer.state.resumed_from = str(where)
    trainer.start_step = trainer.state.step
    trainer.scaler.load_state_dict(meta.get("loss_scale", trainer.scaler.state_dict()))
    if meta["world_size"] == ctx.world_size:
        trainer.batches.load_state_dict(state["loader"][ctx.rank])
        ckpt.restore_rng_state(state["rng"][ctx.rank])
    else:
        trainer.batches.continue_after(state["loader"])
        log.warning(
            "checkpoint written by %d ranks, resuming on %d: model and optimizer resume exactly; the data "
            "stream continues after the furthest row group any old rank had read (nothing is read twice; "
            "their packing buffers and a few row groups per rank are skipped)",
            meta["world_size"],
            ctx.world_size,
        )
    log.info("resumed from %s at step %d", where, trainer.state.step)
    return where


def resume_source(resume: str, run_dir: Path) -> Optional[Path]:
    """The checkpoint a run continues from: `resume=auto` its own latest (None in a fresh run
    directory), `never` none, anything else that checkpoint."""
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    if resume != "never":
        return ckpt.find_checkpoint(resume)
    return None
