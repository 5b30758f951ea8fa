"""The `optim/` and `schedule/` groups: MuonAdamW (or AdamW) and the learning-rate multiplier."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import List

from chatlm.config.fields import setting
from chatlm.errors import ConfigError


class OptimKind(str, enum.Enum):
    muon_adamw = "muon_adamw"
    adamw = "adamw"


class ScheduleKind(str, enum.Enum):
    warmdown = "warmdown"
    cosine = "cosine"
    constant = "constant"


def _betas(default: list[float], help: str) -> List[float]:
    return setting(help=help, factory=lambda: list(default))


def check_range(
    key: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Refuse `value` outside [low, high] (or with open ends), naming the key and the range."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(key, f"must be in {span}, got {value}")


@dataclass
class OptimConfig:
    """MuonAdamW (nanochat's optim.py) or plain AdamW. LRs are given at the d12 reference batch size
    and rescaled by sqrt(batch / reference_batch_tokens)."""

    name: str = setting("muon_adamw", "tag used in comparisons")
    kind: OptimKind = setting(
        OptimKind.muon_adamw, "muon_adamw: Muon for block matrices, AdamW for the rest | adamw: AdamW for everything"
    )
    embedding_lr: float = setting(0.3, "AdamW LR of the token embedding (nanochat: 0.3)")
    unembedding_lr: float = setting(0.008, "AdamW LR of lm_head (nanochat: 0.008)")
    matrix_lr: float = setting(0.02, "Muon LR of every block matrix (nanochat: 0.02)")
    scalar_lr: float = setting(0.5, "AdamW LR of the x0 lambdas (nanochat: 0.5)")
    weight_decay: float = setting(
        0.28, "Muon cautious weight decay at the d12 reference, rescaled with batch and data (nanochat: 0.28)"
    )
    adam_eps: float = setting(1e-10, "AdamW epsilon (nanochat: 1e-10)")
    lm_head_betas: List[float] = _betas([0.8, 0.96], "AdamW betas of lm_head (nanochat: 0.8, 0.96)")
    lm_head_wd: float = setting(0.01, "AdamW weight decay of lm_head (nanochat: 0.01)")
    wte_betas: List[float] = _betas([0.8, 0.995], "AdamW betas of the token embedding (nanochat: 0.8, 0.995)")
    wte_wd: float = setting(0.001, "AdamW weight decay of the token embedding (nanochat: 0.001)")
    ve_lr_mult: float = setting(0.5, "value-embedding LR as a fraction of embedding_lr (nanochat: 0.5)")
    ve_betas: List[float] = _betas([0.8, 0.995], "AdamW betas of the value embeddings (nanochat: 0.8, 0.995)")
    ve_wd: float = setting(0.01, "AdamW weight decay of the value embeddings (nanochat: 0.01)")
    resid_lr_mult: float = setting(0.01, "residual-lambda LR as a fraction of scalar_lr (nanochat: 0.01)")
    resid_betas: List[float] = _betas([0.8, 0.95], "AdamW betas of the residual lambdas (nanochat: 0.8, 0.95)")
    resid_wd: float = setting(0.05, "AdamW weight decay of the residual lambdas (nanochat: 0.05)")
    x0_betas: List[float] = _betas([0.96, 0.95], "AdamW betas of the x0 lambdas (nanochat: 0.96, 0.95)")
    x0_wd: float = setting(0.0, "AdamW weight decay of the x0 lambdas (nanochat: 0)")
    gate_lr: float = setting(0.2, "fixed AdamW LR of the smear and backout scalars, never rescaled (nanochat: 0.2)")
    gate_betas: List[float] = _betas([0.8, 0.95], "AdamW betas of the smear and backout scalars")
    gate_wd: float = setting(0.0, "AdamW weight decay of the smear and backout scalars (nanochat: 0)")
    momentum_start: float = setting(0.85, "Muon momentum at step 0, ramped over momentum_warmup_steps")
    momentum: float = setting(0.97, "Muon momentum after the ramp (nanochat: 0.97)")
    momentum_warmup_steps: int = setting(400, "steps of the Muon momentum ramp (nanochat: 400)")
    momentum_end: float = setting(0.90, "Muon momentum at the last step, reached linearly during the LR warmdown")
    ns_steps: int = setting(5, "Polar Express orthogonalization iterations, 1..5 (nanochat: 5)")
    ns_norm_factor: float = setting(1.01, "the Muon update is divided by its norm x this before Polar Express")
    normuon_beta2: float = setting(0.9, "NorMuon second-moment EMA of the per-row update norms (nanochat: 0.9)")
    row_equalize: bool = setting(True, "NorMuon: equalize the row norms of each update")
    muon_plus: bool = setting(True, "scale updates by max(1, rows / cols)^0.5 (Muon+)")
    cautious_wd: bool = setting(True, "weight decay only where the update and the weight agree in sign")
    dmodel_ref: int = setting(768, "embedding/lm_head LRs scale by (width / this)^-0.5 (nanochat: 768)")
    reference_depth: int = setting(12, "depth of the reference model the LRs and weight decay are tuned at")
    reference_batch_tokens: int = setting(524288, "tokens per step the LRs are given at (nanochat: 2^19)")
    batch_size_exponent: float = setting(0.383, "auto batch ~ (tokens / reference tokens)^this (Power Lines)")

    def __post_init__(self) -> None:
        for key in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "gate_lr"):
            check_range(f"optim.{key}", getattr(self, key), 0.0, math.inf, low_open=True, high_open=True)
        for key in ("ve_lr_mult", "resid_lr_mult"):
            check_range(f"optim.{key}", getattr(self, key), 0.0, math.inf, low_open=True, high_open=True)
        for key in ("weight_decay", "lm_head_wd", "wte_wd", "ve_wd", "resid_wd", "x0_wd", "gate_wd"):
            check_range(f"optim.{key}", getattr(self, key), 0.0, math.inf, high_open=True)
        check_range("optim.adam_eps", self.adam_eps, 0.0, 1.0, low_open=True)
        for key in ("lm_head_betas", "wte_betas", "ve_betas", "resid_betas", "x0_betas", "gate_betas"):
            betas = getattr(self, key)
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ConfigError(f"optim.{key}", f"must be two numbers in [0, 1), got {list(betas)}")
        for key in ("momentum_start", "momentum", "momentum_end", "normuon_beta2"):
            check_range(f"optim.{key}", getattr(self, key), 0.0, 1.0, high_open=True)
        check_range("optim.ns_norm_factor", self.ns_norm_factor, 0.0, math.inf, low_open=True, high_open=True)
        check_range("optim.batch_size_exponent", self.batch_size_exponent, 0.0, 1.0)
        if self.ns_steps < 1 or self.ns_steps > 5:
            raise ConfigError("optim.ns_steps", f"Polar Express has coefficients for 1..5 steps, got {self.ns_steps}")
        for key in ("momentum_warmup_steps",):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("dmodel_ref", "reference_depth", "reference_batch_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}", f"must be >= 1, got {getattr(self, key)}")


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier over the run (nanochat: linear warmup, flat, linear warmdown)."""

    name: str = setting("warmdown", "tag used in comparisons")
    kind: ScheduleKind = setting(ScheduleKind.warmdown, "warmdown (nanochat) | cosine | constant")
    warmup_steps: int = setting(40, "steps of linear warmup from 1/warmup_steps to 1 (nanochat: 40)")
    warmdown_ratio: float = setting(0.65, "fraction of the steps at the end that decay linearly (nanochat: 0.65)")
    final_lr_frac: float = setting(0.05, "LR multiplier at the last step (nanochat: 0.05)")

    def __post_init__(self) -> None:
        check_range("schedule.warmdown_ratio", self.warmdown_ratio, 0.0, 1.0)
        check_range("schedule.final_lr_frac", self.final_lr_frac, 0.0, 1.0)
        if self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
