"""Which optimizer (and which hyperparameters) each GPT parameter gets (spec §2.1, §2.2).

Routing is by attribute name, not by shape: the block matrices go to Muon (including the small VE
gate matrices, which live inside the blocks), everything else to AdamW with its own LR, betas and
weight decay. Group order is fixed (lm_head, wte, value_embeds, resid, x0, gates, then Muon groups by
sorted shape) because the optimizer state is saved by group index.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from chatlm.config import OptimConfig, OptimKind
from chatlm.optim.muon_adamw import MuonAdamW

# AdamW betas for block matrices when `optim.kind == adamw` (nanochat has no such mode; these are
# the betas of its other small-LR AdamW groups).
ADAMW_MATRIX_BETAS = (0.8, 0.95)


def _params_of(obj: Any) -> list[nn.Parameter]:
    """Parameters of a module / a parameter / None (an optional model feature that is switched off)."""
    if obj is None:
        return []
    if isinstance(obj, nn.Parameter):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    raise TypeError(f"expected an nn.Module or nn.Parameter, got {type(obj).__name__}")


def _adamw_group(name: str, params: list, lr: float, betas, eps: float, wd: float) -> dict:
    return {
        "name": name,
        "kind": "adamw",
        "params": params,
        "lr": lr,
        "initial_lr": lr,
        "betas": tuple(float(b) for b in betas),
        "eps": eps,
        "weight_decay": wd,
    }


def build_param_groups(
    model: nn.Module,
    optim_cfg: OptimConfig,
    model_dim: int,
    batch_lr_scale: float,
    muon_weight_decay: Optional[float] = None,
) -> list[dict]:
    """Param groups for MuonAdamW (or, with `optim_cfg.kind == adamw`, AdamW only).

    Args:
        model: a GPT with `lm_head`, `wte`, `value_embeds`, `resid_lambdas`, `x0_lambdas`,
            `smear_gate`, `smear_lambda`, `backout_lambda` and `blocks`. Optional features may be
            absent or None (value embeddings, smear, backout switched off).
        optim_cfg: LRs at the d12 reference (nanochat's CLI defaults), betas, eps, weight decays.
        model_dim: C. lm_head/wte/VE LRs are scaled by (C / dmodel_ref)^-0.5: wider models have
            more output channels per update, so each gets a smaller step.
        batch_lr_scale: sqrt(B / B_ref) from `schedules.depth_transfer`; multiplies the embedding,
            unembedding, scalar and matrix LRs but not the fixed gate LR.
        muon_weight_decay: the depth-scaled Muon weight decay (peak of its cosine schedule);
            defaults to `optim_cfg.weight_decay`. The training loop overwrites the Muon groups'
            `weight_decay` every step anyway.

    Every group records `initial_lr`; the loop sets `lr = initial_lr * lr_multiplier(step)`.
    Raises if a parameter of the model is not routed (a new parameter must get a deliberate home).
    """
    cfg = optim_cfg
    dmodel_scale = (model_dim / cfg.dmodel_ref) ** -0.5
    eps = cfg.adam_eps
    matrix_wd = cfg.weight_decay if muon_weight_decay is None else muon_weight_decay
    embed_lr = cfg.embedding_lr * dmodel_scale * batch_lr_scale

    groups = [
        _adamw_group(
            "lm_head",
            _params_of(model.lm_head),
            cfg.unembedding_lr * dmodel_scale * batch_lr_scale,
            cfg.lm_head_betas,
            eps,
            cfg.lm_head_wd,
        ),
        _adamw_group("wte", _params_of(model.wte), embed_lr, cfg.wte_betas, eps, cfg.wte_wd),
        _adamw_group(
            "value_embeds",
            _params_of(getattr(model, "value_embeds", None)),
            cfg.ve_lr_mult * embed_lr,
            cfg.ve_betas,
            eps,
            cfg.ve_wd,
        ),
        _adamw_group(
            "resid_lambdas",
            _params_of(getattr(model, "resid_lambdas", None)),
            cfg.resid_lr_mult * cfg.scalar_lr * batch_lr_scale,
            cfg.resid_betas,
            eps,
            cfg.resid_wd,
        ),
        _adamw_group(
            "x0_lambdas",
            _params_of(getattr(model, "x0_lambdas", None)),
            cfg.scalar_lr * batch_lr_scale,
            cfg.x0_betas,
            eps,
            cfg.x0_wd,
        ),
        _adamw_group(
            "gates",
            _params_of(getattr(model, "smear_gate", None))
            + _params_of(getattr(model, "smear_lambda", None))
            + _params_of(getattr(model, "backout_lambda", None)),
            cfg.gate_lr,
            cfg.gate_betas,
            eps,
            cfg.gate_wd,
        ),
    ]
    groups = [g for g in groups if g["params"]]

    matrices = list(model.blocks.parameters())
    for name, p in model.blocks.named_parameters():
        if p.dim() != 2:
            raise ValueError(
                f"blocks.{name} has shape {tuple(p.shape)}: every block parameter is routed to "
                "Muon, which needs 2-D matrices"
            )
    matrix_lr = cfg.matrix_lr * batch_lr_scale
    if cfg.kind == OptimKind.adamw or cfg.kind == "adamw":
        if matrices:
            groups.append(_adamw_group("matrices", matrices, matrix_lr, ADAMW_MATRIX_BETAS, eps, matrix_wd))
    else:
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(
                {
                    "name": f"muon_{shape[0]}x{shape[1]}",
                    "kind": "muon",
                    "params": [p for p in matrices if tuple(p.shape) == shape],
                    "lr": matrix_lr,
                    "initial_lr": matrix_lr,
                    "momentum": cfg.momentum,
                    "weight_decay": matrix_wd,
                    "beta2": cfg.normuon_beta2,
                    "ns_steps": cfg.ns_steps,
                    "ns_norm_factor": cfg.ns_norm_factor,
                    "row_equalize": cfg.row_equalize,
                    "muon_plus": cfg.muon_plus,
                    "cautious_wd": cfg.cautious_wd,
                }
            )

    routed = [id(p) for g in groups for p in g["params"]]
    if len(routed) != len(set(routed)):
        raise ValueError("a parameter is routed to two optimizer groups (shared/tied weights?)")
    unrouted = [n for n, p in model.named_parameters() if id(p) not in set(routed)]
    if unrouted:
        raise ValueError(f"parameters not routed to any optimizer group: {unrouted}")
    return groups


def build_optimizer(
    model: nn.Module,
    optim_cfg: OptimConfig,
    model_dim: int,
    batch_lr_scale: float,
    muon_weight_decay: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
    compile: bool = False,
) -> MuonAdamW:
    """`MuonAdamW` over `build_param_groups(...)` (also for kind=adamw: same sharding, no Muon groups)."""
    groups = build_param_groups(model, optim_cfg, model_dim, batch_lr_scale, muon_weight_decay)
    return MuonAdamW(groups, compute_dtype=compute_dtype, compile=compile)
