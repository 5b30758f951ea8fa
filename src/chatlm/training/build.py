"""The model and optimizer of a training run, built the same way by every stage and the benchmark:
meta device -> to_empty -> nanochat's init -> fp8 linears (before compile, so the compiled graph
sees them) -> torch.compile -> MuonAdamW with the depth-transferred LRs and weight decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from chatlm.config import ModelConfig, OptimConfig, ScheduleConfig
from chatlm.optim import build_optimizer, lr_multiplier_from_config, muon_momentum, muon_weight_decay
from chatlm.optim.loss_scale import LossScaler
from chatlm.training.trainer import Hyperparameters, Trainer


@dataclass
class TrainingModel:
    model: Any  # the module whose state is saved
    train_model: Any  # what runs forward: the compiled model, or `model`
    backend: str  # the attention backend in use
    fp8_linears: int  # Linears converted to fp8


def build_training_model(model_cfg: ModelConfig, vocab_size: int, policy: Any, device: torch.device) -> TrainingModel:
    """A freshly initialized GPT (identical on every rank: same seed, no broadcast needed)."""
    from chatlm.model import GPT, select_backend
    from chatlm.model.fp8 import convert_to_fp8

    dtype = policy.compute_dtype
    backend = select_backend(model_cfg.attention_backend, device, dtype)
    with torch.device("meta"):
        model = GPT(model_cfg, vocab_size, dtype, backend)
    model.to_empty(device=device)
    model.init_weights()
    n_fp8 = convert_to_fp8(model) if policy.fp8 else 0
    return TrainingModel(model, policy.compile_model(model), backend, n_fp8)


def build_training_optimizer(model: Any, optim_cfg: OptimConfig, plan: Any, policy: Any) -> Any:
    """MuonAdamW (or AdamW) over the model's parameter groups, LRs scaled by the plan's batch."""
    return build_optimizer(
        model,
        optim_cfg,
        plan.n_embd,
        plan.batch_lr_scale,
        plan.muon_weight_decay,
        compute_dtype=policy.compute_dtype,
        compile=policy.compile,
    )


class TrainingSchedule:
    """nanochat's schedules (§3.4-3.5, §7): the LR multiplier (times `lr_scale`: SFT's init_lr_frac),
    Muon momentum and, when `muon_weight_decay` is given, Muon weight decay (SFT has no WD schedule:
    the optimizer's groups keep theirs)."""

    def __init__(
        self, schedule: ScheduleConfig, optim: OptimConfig, muon_weight_decay: Optional[float], lr_scale: float = 1.0
    ):
        self.schedule, self.optim, self.wd, self.lr_scale = schedule, optim, muon_weight_decay, lr_scale

    def __call__(self, step: int, total: int) -> Hyperparameters:
        o = self.optim
        return Hyperparameters(
            self.lr_scale * lr_multiplier_from_config(self.schedule, step, total),
            muon_momentum(
                step,
                total,
                self.schedule.warmdown_ratio,
                o.momentum_start,
                o.momentum,
                o.momentum_warmup_steps,
                o.momentum_end,
            ),
            None if self.wd is None else muon_weight_decay(step, total, self.wd),
        )


def pretrain_trainer(cfg: Any, built: TrainingModel, plan: Any, batches: Any, ctx: Any, policy: Any) -> Trainer:
    """The pretraining Trainer (its optimizer, schedule and loss scaler) over `batches`: what
    `chatlm.train` runs and `chatlm.bench` times."""
    return Trainer(
        model=built.model,
        train_model=built.train_model,
        optimizer=build_training_optimizer(built.model, cfg.optim, plan, policy),
        batches=batches,
        total_steps=plan.num_iterations,
        grad_accum=plan.grad_accum,
        tokens_per_step=plan.total_batch_size,
        ctx=ctx,
        schedule=TrainingSchedule(cfg.schedule, cfg.optim, plan.muon_weight_decay),
        scaler=LossScaler(enabled=policy.compute_dtype == torch.float16),
    )
