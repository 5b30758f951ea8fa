"""Every number a pretraining run derives from its config, before anything is allocated
(nanochat §3.2-3.3): sizes, batch, gradient accumulation, LR and weight-decay transfer, horizon."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from chatlm.config import ConfigError, ModelConfig
from chatlm.optim import depth_transfer


@dataclass(frozen=True)
class Plan:
    vocab_size: int
    n_embd: int
    n_head: int
    n_layer: int
    windows: tuple[int, ...]
    params: dict
    scaling_params: int
    flops_per_token: int
    ref_scaling_params: int
    target_tokens: int
    total_batch_size: int
    batch_lr_scale: float
    muon_weight_decay: float
    num_iterations: int
    device_batch_size: int
    seq_len: int
    world_size: int
    grad_accum: int
    total_tokens: int
    total_flops: float
    tokens_per_param: float


def meta_model(model_cfg: ModelConfig, vocab_size: int) -> Any:
    """A GPT on the meta device: shapes, parameter counts and FLOPs without memory."""
    from chatlm.model import GPT

    with torch.device("meta"):
        return GPT(model_cfg, vocab_size, torch.float32, "sdpa")


def plan_run(cfg: Any, vocab_size: int, world_size: int) -> Plan:
    """The plan of a run. `cfg` is a TrainConfig or BenchConfig: `model`, `optim`, `hardware`,
    `steps` and `total_batch_size` (and `target_flops`, `target_param_data_ratio` when it has them)."""
    model = meta_model(cfg.model, vocab_size)
    ref = meta_model(replace(cfg.model, depth=cfg.optim.reference_depth, backout_layer=None), vocab_size)
    transfer = depth_transfer(
        model.num_scaling_params(),
        ref.num_scaling_params(),
        getattr(cfg, "target_param_data_ratio", 12.0),
        cfg.optim.weight_decay,
        cfg.total_batch_size,
        cfg.optim.reference_batch_tokens,
        cfg.optim.batch_size_exponent,
        cfg.steps,
        getattr(cfg, "target_flops", -1.0),
        model.flops_per_token(),
    )
    B, T = cfg.hardware.device_batch_size, cfg.model.sequence_len
    micro = B * T * world_size
    if transfer.batch_tokens % micro:
        raise ConfigError(
            "total_batch_size",
            f"{transfer.batch_tokens:,} tokens per step is not a multiple of device_batch_size x "
            f"sequence_len x world_size = {B} x {T} x {world_size} = {micro:,}; change total_batch_size "
            "or hardware.device_batch_size",
        )
    if transfer.num_iterations < 1:
        raise ConfigError("steps", f"the derived horizon is {transfer.num_iterations} steps; set steps explicitly")
    d = model.dims
    total_tokens = transfer.num_iterations * transfer.batch_tokens
    return Plan(
        vocab_size=vocab_size,
        n_embd=d.n_embd,
        n_head=d.n_head,
        n_layer=d.n_layer,
        windows=tuple(d.windows),
        params=model.num_params(),
        scaling_params=model.num_scaling_params(),
        flops_per_token=model.flops_per_token(),
        ref_scaling_params=ref.num_scaling_params(),
        target_tokens=transfer.target_tokens,
        total_batch_size=transfer.batch_tokens,
        batch_lr_scale=transfer.batch_lr_scale,
        muon_weight_decay=transfer.weight_decay,
        num_iterations=transfer.num_iterations,
        device_batch_size=B,
        seq_len=T,
        world_size=world_size,
        grad_accum=transfer.batch_tokens // micro,
        total_tokens=total_tokens,
        total_flops=float(model.flops_per_token()) * total_tokens,
        tokens_per_param=total_tokens / model.num_scaling_params(),
    )


def describe_plan(plan: Plan) -> list[str]:
    """The plan as the two lines a run logs at start (and `--plan` prints)."""
    T = plan.seq_len
    windows = "".join("L" if w >= T else "S" for w in plan.windows)
    return [
        f"model d{plan.n_layer}: width {plan.n_embd}, {plan.n_head} heads, windows {windows} | "
        f"{plan.params['total']:,} params ({plan.scaling_params:,} scaling) | {plan.flops_per_token:.3g} FLOPs/token",
        f"batch {plan.total_batch_size:,} tokens/step (LR x{plan.batch_lr_scale:.3f}, Muon WD "
        f"{plan.muon_weight_decay:.4f}) = {plan.device_batch_size} x {T} x {plan.world_size} ranks x "
        f"{plan.grad_accum} accumulation | {plan.num_iterations:,} steps | {plan.total_tokens:,} tokens "
        f"({plan.tokens_per_param:.1f} tokens/param) | {plan.total_flops:.3g} FLOPs",
    ]


def effective_config(resolved: dict, cfg: Any) -> dict:
    """The resolved config with the model's window settings replaced by the windows they derive
    (`SSSL` on a 2-layer model is `SL`): two sweep points with the same effective config train the
    same model on the same data. Configs without a model are returned as they are."""
    from chatlm.model.sizing import derive_dims

    model = getattr(cfg, "model", None)
    if model is None:
        return resolved
    vocab = model.vocab_size or getattr(getattr(cfg, "tokenizer", None), "vocab_size", None) or 256
    dims = derive_dims(model, vocab)
    out = dict(resolved)
    out["model"] = {
        k: v
        for k, v in dict(resolved.get("model") or {}).items()
        if k not in ("window_pattern", "short_window", "short_window_divisor", "window_round", "backout_layer")
    }
    out["model"].update(windows=list(dims.windows), backout_layer=dims.backout_layer)
    return out
