"""MuonAdamW: nanochat's single optimizer for every parameter of the GPT.

Each param group carries `kind = 'adamw'` or `kind = 'muon'`:

* AdamW groups (embeddings, unembedding, scalars, gates) take a plain decoupled-weight-decay Adam
  step per tensor.
* Muon groups hold K matrices of one shape. They are stacked into a (K, rows, cols) tensor and
  updated together: momentum, orthogonalization by Polar Express, NorMuon per-neuron scaling and
  cautious weight decay (spec §2.4, update order in §18.1).

The math lives in two plain functions, `adamw_update` and `muon_update`, that take tensors and
numbers only. That keeps them free of optimizer state bookkeeping, so `compile=True` can wrap them
with `torch.compile(dynamic=False, fullgraph=True)`; in that mode the hyperparameters that change
every step (lr, momentum, weight decay, bias corrections) are passed as 0-D CPU tensors, so a new
value is new data, not a new graph.

Distributed training uses the same class and needs no DDP wrapper: gradients accumulate locally and
are averaged inside `step()` (nothing is communicated when torch.distributed is not initialized or
the world size is 1). Small AdamW tensors are all-reduced and updated everywhere; large ones are
reduce-scattered along dim 0, each rank updates its slice with sharded Adam state and the parameter is
all-gathered back (ZeRO-2 style). Muon groups are reduce-scattered by matrix: each rank owns
ceil(K/W) matrices, orthogonalizes only those and the results are all-gathered. Unlike nanochat,
no divisibility is required: dim 0 (AdamW) and the matrix count (Muon) are zero-padded. Zero rows
and zero matrices stay exactly zero through both updates, so padding never leaks into the model.

Because the optimizer state is sharded by rank, `state_dict()` is tied to the world size it was
taken at. `full_state_dict()` / `load_full_state_dict()` save and restore a world-size independent
form keyed by (group index, param index), so a run can resume on a different number of GPUs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

# (a, b, c) per iteration, computed for 5 iterations with safety factor 2e-2 and cushion 2
# (Polar Express, arXiv 2505.16932). Iteration i applies p(X) = aX + b(XXᵀ)X + c(XXᵀ)²X.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# AdamW tensors with fewer elements than this are all-reduced and updated on every rank; sharding
# them would cost more in launch latency than it saves in memory.
ADAMW_SHARD_MIN_NUMEL = 1024

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "momentum", "weight_decay")
MUON_DEFAULTS: dict[str, Any] = {
    "beta2": 0.9,
    "ns_steps": 5,
    "ns_norm_factor": 1.01,
    "row_equalize": True,
    "muon_plus": True,
    "cautious_wd": True,
}


# ----------------------------------------------------------------------------------------------
# the math (plain functions: tensors and numbers in, in-place updates out)


def adamw_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    bias_correction1,
    bias_correction2,
) -> None:
    """One AdamW step on one tensor (or one dim-0 shard of it), in place.

    All arithmetic is fp32 even when `p` and its moments are stored in bf16 (nanochat keeps wte/VE
    and their Adam states in bf16): values are upcast, updated, and written back. Weight decay is
    decoupled (applied to the weights, not added to the gradient), as in torch.optim.AdamW.
    `bias_correction{1,2}` are 1 - beta^t for this tensor's own step count t.
    """
    p32, g = p.float(), grad.float()
    m, v = exp_avg.float(), exp_avg_sq.float()
    p32.mul_(1 - lr * weight_decay)
    m.mul_(beta1).add_((1 - beta1) * g)  # = lerp(m, g, 1 - beta1)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    denom = (v / bias_correction2).sqrt() + eps
    p32.sub_((lr / bias_correction1) * m / denom)
    # .float() returns the tensor itself for fp32 storage; only write back real copies.
    for stored, value in ((p, p32), (exp_avg, m), (exp_avg_sq, v)):
        if stored.dtype != torch.float32:
            stored.copy_(value)


def _frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norm of a (..., rows, cols) stack, shaped to broadcast back."""
    return x.norm(dim=(-2, -1), keepdim=True)


def row_equalize(x: torch.Tensor) -> torch.Tensor:
    """MuonEq: give every row the same norm, ‖X‖_F / sqrt(rows), keeping the total norm.

    Rows whose gradient happens to be large would otherwise dominate the orthogonalization's
    starting point; equalizing them first makes Polar Express treat all output neurons alike.
    """
    xf = x.float()
    rows = x.shape[-2]
    row_norm = xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    target = _frobenius(xf) / math.sqrt(rows)
    return (xf * (target / row_norm)).to(x.dtype)


def polar_express(x: torch.Tensor, steps: int = 5, norm_factor: float = 1.01) -> torch.Tensor:
    """Approximate the polar factor U Vᵀ of each matrix in a (..., rows, cols) stack.

    The input is first scaled by 1 / (norm_factor·‖X‖_F + 1e-6) so every singular value is below 1,
    then `steps` odd-polynomial iterations with the Polar Express coefficients push all singular
    values towards 1 (the result is an approximation: singular values end in a band around 1).
    The Gram matrix is formed on the smaller side: XXᵀ for wide/square matrices, XᵀX for tall ones.
    Runs in the dtype of `x` (bf16 on GPU: these are the optimizer's big matmuls).
    """
    rows, cols = x.shape[-2:]
    x = x / (norm_factor * _frobenius(x) + 1e-6)
    wide = rows <= cols
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if wide:
            gram = x @ x.mT
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
        else:
            gram = x.mT @ x
            poly = b * gram + c * (gram @ gram)
            x = a * x + x @ poly
    return x


def normuon_scale(u: torch.Tensor, second_moment: torch.Tensor, beta2) -> torch.Tensor:
    """NorMuon (arXiv 2510.05491): per-neuron second-moment normalization that keeps ‖u‖_F.

    `second_moment` is factored: (K, rows, 1) per-row statistics when rows >= cols, else
    (K, 1, cols) per-column ones. It is an EMA of mean(u²) along the other axis and is updated in
    place. Each row (or column) is divided by the root of its EMA, then the whole matrix is rescaled
    back to its original Frobenius norm, so only the relative scale of neurons changes.
    """
    rows, cols = u.shape[-2:]
    axis = -1 if rows >= cols else -2
    v_mean = (u * u).mean(dim=axis, keepdim=True)
    second_moment.mul_(beta2).add_((1 - beta2) * v_mean)  # = lerp(s, v_mean, 1 - beta2)
    scaled = u * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (_frobenius(u) / _frobenius(scaled).clamp_min(1e-10))


def muon_update(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buffer: torch.Tensor,
    second_momentum_buffer: torch.Tensor,
    lr,
    momentum,
    weight_decay,
    beta2,
    *,
    ns_steps: int = 5,
    ns_norm_factor: float = 1.01,
    use_row_equalize: bool = True,
    muon_plus: bool = True,
    cautious_wd: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
) -> None:
    """One Muon step on a (K, rows, cols) stack of same-shape matrices; `params` updated in place.

    Order (spec §2.4): Nesterov-style momentum → cast to the compute dtype → MuonEq row
    equalization → Polar Express → Muon+ rescale to ‖X‖_F = sqrt(min(rows, cols)) → NorMuon →
    cautious weight decay and the update with lr · sqrt(max(1, rows/cols)) (tall matrices such as
    the MLP's c_fc get a larger step, since their orthogonalized update has smaller entries).
    Flags switch the optional stages off; the scalars may be floats or 0-D tensors.
    """
    rows, cols = params.shape[-2:]
    g = grads.float()
    buf = momentum_buffer.float()
    buf.mul_(momentum).add_((1 - momentum) * g)  # buf ← lerp(buf, g, 1 - μ)
    u = (1 - momentum) * g + momentum * buf  # Nesterov look-ahead: lerp(g, buf, μ)
    if momentum_buffer.dtype != torch.float32:
        momentum_buffer.copy_(buf)

    x = u.to(compute_dtype) if compute_dtype is not None else u
    if use_row_equalize:
        x = row_equalize(x)
    x = polar_express(x, ns_steps, ns_norm_factor)
    u = x.float()
    if muon_plus:
        u = u * (math.sqrt(min(rows, cols)) / _frobenius(u).clamp_min(1e-6))
    u = normuon_scale(u, second_momentum_buffer, beta2)

    p32 = params.float()
    lr_eff = lr * math.sqrt(max(1.0, rows / cols))
    decay = p32 * (u * p32 >= 0) if cautious_wd else p32  # only shrink weights the update agrees with
    p32.sub_(lr_eff * u + (lr_eff * weight_decay) * decay)
    if params.dtype != torch.float32:
        params.copy_(p32)


# ----------------------------------------------------------------------------------------------
# communication helpers


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.13 renamed reduce_scatter_tensor (same signature); use the new name where it exists.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _all_gather(output: torch.Tensor, shard: torch.Tensor, async_op: bool = True):
    return dist.all_gather_into_tensor(output, shard.contiguous(), async_op=async_op)


def _padded_rows(n: int, world: int) -> tuple[int, int]:
    """(rows per rank, padded total) for splitting n rows over `world` ranks."""
    chunk = -(-n // world)
    return chunk, chunk * world


def _pad0(t: torch.Tensor, total: int) -> torch.Tensor:
    """`t` zero-padded (or returned as is) to `total` entries along dim 0."""
    if t.shape[0] == total:
        return t.contiguous()
    out = t.new_zeros((total,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _gather_full(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Concatenate every rank's dim-0 shard (collective) and drop the padding beyond n rows."""
    if world == 1:
        return local[:n]
    full = local.new_empty((local.shape[0] * world,) + tuple(local.shape[1:]))
    _all_gather(full, local, async_op=False)
    return full[:n]


# ----------------------------------------------------------------------------------------------
# the optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the transformer's matrices, AdamW for everything else, in one optimizer.

    Args:
        param_groups: dicts with `params`, `kind` ('adamw' or 'muon') and that kind's
            hyperparameters. AdamW: lr, betas, eps, weight_decay. Muon: lr, momentum, weight_decay
            and optionally beta2, ns_steps, ns_norm_factor, row_equalize, muon_plus, cautious_wd
            (defaults: nanochat's). All params of a Muon group must be 2-D and of one shape.
            Any other keys (name, initial_lr, ...) are kept untouched.
        compute_dtype: dtype of the Muon orthogonalization (bf16 on GPU for speed; None or fp32
            keeps fp32). fp16 is refused: Polar Express' intermediate values overflow its range.
        compile: wrap the two update functions with torch.compile(dynamic=False, fullgraph=True).
    """

    def __init__(
        self, param_groups: Iterable[dict], *, compute_dtype: Optional[torch.dtype] = None, compile: bool = False
    ):
        groups = [dict(g) for g in param_groups]
        for i, group in enumerate(groups):
            group["params"] = list(group["params"])
            kind = group.get("kind")
            if kind == "adamw":
                required = ADAMW_KEYS
            elif kind == "muon":
                required = MUON_KEYS
                for key, value in MUON_DEFAULTS.items():
                    group.setdefault(key, value)
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(
                        f"param group {i} ({group.get('name', 'muon')}): Muon needs 2-D params "
                        f"of one shape, got shapes {sorted(shapes)}"
                    )
            else:
                raise ValueError(f"param group {i}: kind must be 'adamw' or 'muon', got {kind!r}")
            missing = [k for k in required if k not in group]
            if missing:
                raise ValueError(f"param group {i} ({group.get('name', kind)}): missing {missing}")
            group.setdefault("initial_lr", group["lr"])
        if compute_dtype == torch.float16:
            raise ValueError("compute_dtype float16 is not supported by Polar Express (range); use bfloat16")
        super().__init__(groups, {})
        self.compute_dtype = compute_dtype
        self.compiled = compile
        self._adamw_fn: Callable = adamw_update
        self._muon_fn: Callable = muon_update
        if compile:
            self._adamw_fn = torch.compile(adamw_update, dynamic=False, fullgraph=True)
            self._muon_fn = torch.compile(muon_update, dynamic=False, fullgraph=True)

    # -- helpers ---------------------------------------------------------------------------------

    def _scalar(self, value: float):
        """A per-step hyperparameter: a float eagerly, a 0-D CPU tensor when compiled (no recompiles)."""
        return torch.tensor(float(value), dtype=torch.float32) if self.compiled else float(value)

    @staticmethod
    def _adamw_sharded(p: torch.Tensor, world: int) -> bool:
        return world > 1 and p.dim() >= 1 and p.numel() >= ADAMW_SHARD_MIN_NUMEL

    def _adamw_state(self, p: torch.Tensor, local_shape: tuple[int, ...]) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(local_shape, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(local_shape, dtype=p.dtype, device=p.device)
        return state

    @staticmethod
    def _muon_second_shape(chunk: int, rows: int, cols: int) -> tuple[int, int, int]:
        return (chunk, rows, 1) if rows >= cols else (chunk, 1, cols)

    def _muon_state(self, group: dict, chunk: int) -> dict:
        p0 = group["params"][0]
        rows, cols = p0.shape
        state = self.state[p0]
        if not state:
            state["momentum_buffer"] = torch.zeros((chunk, rows, cols), dtype=p0.dtype, device=p0.device)
            state["second_momentum_buffer"] = torch.zeros(
                self._muon_second_shape(chunk, rows, cols), dtype=torch.float32, device=p0.device
            )
        return state

    # -- phase 1: launch gradient reductions -----------------------------------------------------

    def _reduce_adamw(self, group: dict, world: int) -> list:
        tasks = []
        for p in group["params"]:
            if p.grad is None:
                tasks.append(None)
            elif world == 1:
                tasks.append((p.grad, None))
            elif not self._adamw_sharded(p, world):
                tasks.append((p.grad, dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True)))
            else:
                chunk, total = _padded_rows(p.shape[0], world)
                shard = p.grad.new_empty((chunk,) + tuple(p.shape[1:]))
                work = _reduce_scatter(shard, _pad0(p.grad, total), op=dist.ReduceOp.AVG, async_op=True)
                tasks.append((shard, work))
        return tasks

    def _reduce_muon(self, group: dict, world: int):
        params = group["params"]
        if all(p.grad is None for p in params):
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world == 1:
            return torch.stack(grads), None, None
        chunk, total = _padded_rows(len(params), world)
        stacked = grads[0].new_zeros((total,) + tuple(params[0].shape))
        torch._foreach_copy_(list(stacked[: len(params)].unbind(0)), grads)
        shard = stacked.new_empty((chunk,) + tuple(params[0].shape))
        work = _reduce_scatter(shard, stacked, op=dist.ReduceOp.AVG, async_op=True)
        return shard, work, stacked

    # -- phase 2: per group, wait + compute + launch gathers -------------------------------------

    def _step_adamw(self, group: dict, tasks: list, rank: int, world: int) -> list:
        finishers = []
        beta1, beta2 = group["betas"]
        lr, eps, wd = self._scalar(group["lr"]), self._scalar(group["eps"]), self._scalar(group["weight_decay"])
        b1, b2 = self._scalar(beta1), self._scalar(beta2)
        for p, task in zip(group["params"], tasks):
            if task is None:
                continue
            grad, work = task
            if work is not None:
                work.wait()
            sharded = self._adamw_sharded(p, world)
            if sharded:
                chunk, total = _padded_rows(p.shape[0], world)
                full = _pad0(p.detach(), total)  # p itself when no padding is needed
                local = full[rank * chunk : (rank + 1) * chunk]
            else:
                full, local = p.detach(), p.detach()
            state = self._adamw_state(p, tuple(local.shape))
            state["step"] += 1
            t = state["step"]
            self._adamw_fn(
                local,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                lr,
                b1,
                b2,
                eps,
                wd,
                self._scalar(1 - beta1**t),
                self._scalar(1 - beta2**t),
            )
            if sharded:
                work = _all_gather(full, local)
                finishers.append((work, p, full))
        return finishers

    def _step_muon(self, group: dict, reduced, rank: int, world: int) -> list:
        if reduced is None:
            return []
        grads, work, stacked = reduced
        if work is not None:
            work.wait()
        params = group["params"]
        k = len(params)
        chunk = grads.shape[0]
        lo, hi = min(rank * chunk, k), min((rank + 1) * chunk, k)
        if world == 1:
            owned = torch.stack([p.detach() for p in params])
        else:
            owned = params[0].new_zeros((chunk,) + tuple(params[0].shape))
            if hi > lo:
                torch._foreach_copy_(list(owned[: hi - lo].unbind(0)), [p.detach() for p in params[lo:hi]])
        state = self._muon_state(group, chunk)
        self._muon_fn(
            owned,
            grads,
            state["momentum_buffer"],
            state["second_momentum_buffer"],
            self._scalar(group["lr"]),
            self._scalar(group["momentum"]),
            self._scalar(group["weight_decay"]),
            self._scalar(group["beta2"]),
            ns_steps=int(group["ns_steps"]),
            ns_norm_factor=float(group["ns_norm_factor"]),
            use_row_equalize=bool(group["row_equalize"]),
            muon_plus=bool(group["muon_plus"]),
            cautious_wd=bool(group["cautious_wd"]),
            compute_dtype=self.compute_dtype,
        )
        if world == 1:
            torch._foreach_copy_([p.detach() for p in params], list(owned.unbind(0)))
            return []
        gathered = stacked if stacked.dtype == owned.dtype else torch.empty_like(stacked, dtype=owned.dtype)
        return [(_all_gather(gathered, owned), params, gathered)]

    def set_hyperparameters(
        self, lr_multiplier: float, muon_momentum: Optional[float] = None, muon_weight_decay: Optional[float] = None
    ) -> None:
        """Apply this step's schedules: every group gets lr = initial_lr · lr_multiplier; Muon groups
        also get the scheduled momentum and weight decay (AdamW weight decays stay constant)."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                if muon_momentum is not None:
                    group["momentum"] = muon_momentum
                if muon_weight_decay is not None:
                    group["weight_decay"] = muon_weight_decay

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Average gradients across ranks (if distributed) and update every group.

        Phase 1 launches every reduction, phase 2 goes through the groups in order (wait for its
        gradients, compute, launch its gathers) so communication overlaps computation, phase 3
        waits for the gathers and writes the gathered results into the parameters.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = _world()
        reduced = [
            self._reduce_adamw(g, world) if g["kind"] == "adamw" else self._reduce_muon(g, world)
            for g in self.param_groups
        ]
        finishers = []
        for group, red in zip(self.param_groups, reduced):
            if group["kind"] == "adamw":
                finishers += self._step_adamw(group, red, rank, world)
            else:
                finishers += self._step_muon(group, red, rank, world)
        for work, target, gathered in finishers:
            work.wait()
            if isinstance(target, list):  # a Muon group: K params from the gathered stack
                torch._foreach_copy_([p.detach() for p in target], list(gathered[: len(target)].unbind(0)))
            elif gathered.data_ptr() != target.data_ptr():  # a padded AdamW param
                target.detach().copy_(gathered[: target.shape[0]])
        return loss

    # -- world-size independent checkpoints ------------------------------------------------------

    def full_state_dict(self) -> dict:
        """The optimizer state as full (unsharded) CPU tensors. Collective: every rank must call it.

        Layout: {'state': {group_idx: {param_idx: {...}}}, 'param_groups': [hyperparameters]}.
        Muon state sits under param index 0 of its group as (K, ...) stacks; AdamW moments have the
        parameter's full shape. Param groups record the param count and shapes so a mismatching
        model is reported on load instead of silently mis-assigned.
        """
        rank, world = _world()
        state_out: dict[int, dict[int, dict[str, Any]]] = {}
        groups_out = []
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            hyper = {k: v for k, v in group.items() if k != "params"}
            hyper["param_shapes"] = [tuple(p.shape) for p in params]
            groups_out.append(hyper)
            entries: dict[int, dict[str, Any]] = {}
            if group["kind"] == "adamw":
                for pi, p in enumerate(params):
                    st = self.state.get(p)
                    if not st:
                        continue
                    entry = {"step": int(st["step"])}
                    for key in ("exp_avg", "exp_avg_sq"):
                        t = st[key]
                        if self._adamw_sharded(p, world):
                            t = _gather_full(t, p.shape[0], world)
                        entry[key] = t.detach().cpu().clone()
                    entries[pi] = entry
            else:
                st = self.state.get(params[0])
                if st:
                    entries[0] = {
                        key: _gather_full(st[key], len(params), world).detach().cpu().clone()
                        for key in ("momentum_buffer", "second_momentum_buffer")
                    }
            state_out[gi] = entries
        return {"state": state_out, "param_groups": groups_out}

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load `full_state_dict()` output (from any world size) and re-shard it for this one."""
        rank, world = _world()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            shapes = [tuple(p.shape) for p in group["params"]]
            saved_shapes = [tuple(s) for s in saved["param_shapes"]]
            if saved["kind"] != group["kind"] or saved_shapes != shapes:
                raise ValueError(
                    f"param group {gi} ({group.get('name', group['kind'])}) does not match the "
                    f"saved one: kind {saved['kind']} vs {group['kind']}, shapes {saved_shapes} "
                    f"vs {shapes}"
                )
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_shapes")})
            params = group["params"]
            for p in params:
                self.state.pop(p, None)
            entries = state_dict["state"].get(gi, {})
            if group["kind"] == "adamw":
                for pi, entry in entries.items():
                    p = params[int(pi)]
                    st = {"step": int(entry["step"])}
                    for key in ("exp_avg", "exp_avg_sq"):
                        t = entry[key].to(device=p.device, dtype=p.dtype)
                        if self._adamw_sharded(p, world):
                            chunk, total = _padded_rows(p.shape[0], world)
                            t = _pad0(t, total)[rank * chunk : (rank + 1) * chunk].clone()
                        st[key] = t.contiguous()
                    self.state[p] = st
            elif 0 in entries:
                p0 = params[0]
                chunk, total = _padded_rows(len(params), world) if world > 1 else (len(params), len(params))
                st = {}
                for key, dtype in (("momentum_buffer", p0.dtype), ("second_momentum_buffer", torch.float32)):
                    t = _pad0(entries[0][key].to(device=p0.device, dtype=dtype), total)
                    st[key] = t[rank * chunk : (rank + 1) * chunk].clone()
                self.state[p0] = st
