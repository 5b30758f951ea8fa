"""Optimizer (MuonAdamW), parameter routing and schedules (nanochat spec §2, §3.2–3.5)."""

from chatlm.optim.muon_adamw import (
    POLAR_EXPRESS_COEFFS,
    MuonAdamW,
    adamw_update,
    muon_update,
    normuon_scale,
    polar_express,
    row_equalize,
)
from chatlm.optim.param_groups import build_optimizer, build_param_groups
from chatlm.optim.schedules import (
    Transfer,
    auto_batch_size,
    batch_lr_scale,
    depth_transfer,
    lr_multiplier,
    lr_multiplier_from_config,
    muon_momentum,
    muon_weight_decay,
    num_iterations,
    scaled_weight_decay,
)

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "MuonAdamW",
    "adamw_update",
    "muon_update",
    "normuon_scale",
    "polar_express",
    "row_equalize",
    "build_optimizer",
    "build_param_groups",
    "Transfer",
    "auto_batch_size",
    "batch_lr_scale",
    "depth_transfer",
    "lr_multiplier",
    "lr_multiplier_from_config",
    "muon_momentum",
    "muon_weight_decay",
    "num_iterations",
    "scaled_weight_decay",
]
