"""nanochat's GPT, with every architectural constant read from ModelConfig.

Architecture (nanochat HEAD, spec §1): token embedding -> parameter-free RMSNorm -> smear (mix in
the previous token's embedding through a learned gate) -> L pre-norm blocks with per-layer
residual/x0 lambdas, value embeddings on alternating layers, RoPE + QK-norm attention with sliding
windows and a ReLU^2 MLP -> backout (subtract a fraction of the mid-network residual) -> final norm
-> untied lm_head -> fp32 logits with a tanh softcap.

Mixed precision is explicit, with no autocast: Linear weights are fp32 masters that `Linear` casts
to the activation dtype on the fly; the embedding tables are stored in the compute dtype, so the
activations take the compute dtype from the very first op.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatlm.config import ConfigError, ModelConfig
from chatlm.model.attention import BACKENDS, causal_attention, prepare_backend
from chatlm.model.qkv_rope import apply_rotary, qkv_rope, triton_usable
from chatlm.model.sizing import ModelDims, derive_dims
from chatlm.model.softcap_ce import fused_softcap_ce, plain_softcap_ce, softcap_logits
from chatlm.model.triton_check import triton_available


class Linear(nn.Linear):
    """Bias-free Linear whose fp32 master weight is cast to the input's dtype at each call."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight^T the way this module multiplies (fp8's Float8Linear overrides it); also
        used with another weight, e.g. the concatenated q|k|v weights."""
        return F.linear(x, weight.to(dtype=x.dtype))


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learnable weight, default eps (runs in the activation dtype)."""
    return F.rms_norm(x, (x.size(-1),))


def storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Embedding tables live in the compute dtype, except fp16 (GradScaler cannot unscale fp16 grads)."""
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ModelDims, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = dims.n_head, dims.n_kv_head, dims.head_dim
        self.window = dims.windows[layer_idx]
        self.qk_scale = cfg.qk_scale
        C = dims.n_embd
        self.c_q = Linear(C, self.n_head * self.head_dim, device=device)
        self.c_k = Linear(C, self.n_kv_head * self.head_dim, device=device)
        self.c_v = Linear(C, self.n_kv_head * self.head_dim, device=device)
        self.c_proj = Linear(self.n_head * self.head_dim, C, device=device)
        # ResFormer-style value embedding gate: a few input channels -> one gate per kv head.
        self.ve_gate = Linear(cfg.ve_gate_channels, self.n_kv_head, device=device) if dims.has_ve(layer_idx) else None
        self.ve_gate_channels = cfg.ve_gate_channels
        self.ve_gate_range = cfg.ve_gate_range
        self.qkv_mode = getattr(cfg.qkv_matmul, "value", cfg.qkv_matmul)
        self.rope_kernel = getattr(cfg.rope_kernel, "value", cfg.rope_kernel)
        # resolved here, never inside a compiled trace (as GPT._triton)
        self._rope_triton = torch.cuda.is_available() and triton_usable(self.head_dim)
        self.qkv_weight: Optional[torch.Tensor] = None  # [Wq; Wk; Wv] held once (`fuse_qkv_weights`)

    def forward(
        self,
        x: torch.Tensor,
        ve: Optional[torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str,
        kv_cache: Optional[Any],
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.fused_prologue(x) and cos.size(0) == 1:  # the op takes one table for the batch
            v_extra = None if ve is None else self.value_extra(x, ve)
            q, k, v = qkv_rope(self.qkv_matmul(x), cos, sin, v_extra, H, Hkv, self.qk_scale)
        else:
            q, k, v = self.project_qkv(x)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
            if ve is not None:
                v = v + self.value_extra(x, ve)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            # QK-norm, then a fixed extra logit scale on both (1.2 * 1.2 = 1.44 on the scores).
            q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale
        if kv_cache is None:
            y = causal_attention(q, k, v, window=self.window, backend=backend)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v, window=self.window, backend=backend)
        return self.c_proj(y.reshape(B, T, -1))

    def value_extra(self, x: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
        """What the value embedding adds to v: gate = range * sigmoid(W x[:channels]), one per kv head."""
        B, T, _ = x.shape
        gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
        return gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)

    def same_kind_qkv(self) -> bool:
        """The three projections multiply the same way (all plain, or all fp8 Float8Linear)."""
        return type(self.c_q) is type(self.c_k) is type(self.c_v) and isinstance(self.c_q, Linear)

    def qkv_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ [Wq; Wk; Wv]^T: one matmul into q|k|v, from the three weights concatenated at each
        call. The backward then gets x's gradient from one matmul instead of three plus a sum. The
        weights stay three parameters (Muon orthogonalizes each one; checkpoints keep nanochat's
        names). In fp8 the three weights share one tensorwise scale, and dq|dk|dv one."""
        weight = self.qkv_weight
        if weight is None:
            weight = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
        return self.c_q.linear(x, weight)

    @torch.no_grad()
    def fuse_qkv_weights(self) -> None:
        """For inference: concatenate the three weights once and make c_q, c_k, c_v views into the
        result, so `qkv_matmul` stops copying them on every call (a decode step would otherwise
        copy every q|k|v weight once more than it reads it). Not for a model that trains on."""
        if not self.same_kind_qkv():
            return
        fused = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
        q, k = self.c_q.out_features, self.c_k.out_features
        self.c_q.weight.data, self.c_k.weight.data, self.c_v.weight.data = fused[:q], fused[q : q + k], fused[q + k :]
        self.qkv_weight = fused

    def fused_qkv(self, x: torch.Tensor) -> bool:
        """Whether q, k, v come from one matmul (`model.qkv_matmul`). auto: on CUDA, for bf16 and
        for fp8 projections alike (in fp8 the three weights then share one tensorwise scale; over
        200 d12 steps that matched three scales to 0.03 % in validation bpb, docs/performance.md)."""
        return self.same_kind_qkv() and (self.qkv_mode == "fused" or self.qkv_mode == "auto" and x.is_cuda)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, T, channels): one matmul split by views (see `fused_qkv`), else
        nanochat's three."""
        if not self.fused_qkv(x):
            return self.c_q(x), self.c_k(x), self.c_v(x)
        return self.qkv_matmul(x).split([self.c_q.out_features, self.c_k.out_features, self.c_v.out_features], dim=-1)

    def fused_prologue(self, x: torch.Tensor) -> bool:
        """Whether RoPE + QK-norm run as the `qkv_rope` op (`model.rope_kernel`): it needs the fused
        q|k|v matmul; auto: on CUDA when the Triton kernels import."""
        if self.rope_kernel == "plain" or not self.fused_qkv(x):
            return False
        return self.rope_kernel == "fused" or (x.is_cuda and self._rope_triton)


class MLP(nn.Module):
    def __init__(self, n_embd: int, device=None):
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd, device=device)
        self.c_proj = Linear(4 * n_embd, n_embd, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ModelDims, layer_idx: int, device=None):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, dims, layer_idx, device=device)
        self.mlp = MLP(dims.n_embd, device=device)

    def forward(self, x, ve, cos, sin, backend, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, backend, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """nanochat's GPT. Build on `meta`, then `to_empty(device=...)` and `init_weights()`.

    `attention_backend` is a resolved backend name ('fa4' | 'flex' | 'sdpa', see
    attention.select_backend); an instance attribute (not a module global) that may be changed
    between calls, e.g. to evaluate one model under two kernels.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: Optional[int] = None,
        compute_dtype: torch.dtype = torch.float32,
        attention_backend: str = "sdpa",
        device=None,
    ):
        super().__init__()
        self.config = cfg
        self.dims = dims = derive_dims(cfg, vocab_size)
        self.compute_dtype = compute_dtype
        self.attention_backend = attention_backend  # a property: registers the backend's kernels
        # resolved here, never inside a compiled trace; without CUDA the kernel could not run anyway
        self._triton = torch.cuda.is_available() and triton_available()
        C, L, Vp = dims.n_embd, dims.n_layer, dims.padded_vocab_size
        emb_dtype = storage_dtype(compute_dtype)

        self.wte = nn.Embedding(Vp, C, device=device, dtype=emb_dtype)
        self.blocks = nn.ModuleList([Block(cfg, dims, i, device=device) for i in range(L)])
        self.lm_head = Linear(C, Vp, device=device)
        kv_dim = dims.n_kv_head * dims.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(Vp, kv_dim, device=device, dtype=emb_dtype) for i in sorted(dims.ve_layers)}
        )
        self.resid_lambdas = nn.Parameter(torch.ones(L, device=device))
        self.x0_lambdas = nn.Parameter(torch.zeros(L, device=device))
        if cfg.smear:
            self.smear_gate = Linear(cfg.smear_channels, 1, device=device)
            self.smear_lambda = nn.Parameter(torch.zeros((), device=device))
        else:
            self.smear_gate, self.smear_lambda = None, None
        self.backout_lambda = nn.Parameter(torch.zeros((), device=device)) if cfg.backout else None
        # RoPE tables are derived state, not parameters: non-persistent, recomputed by init_weights.
        cos, sin = self._rotary_tables(device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ConfigError(
                "model.attention_backend",
                f"GPT needs a resolved backend ({', '.join(BACKENDS)}; resolve 'auto' with "
                f"chatlm.model.select_backend), got {name!r}",
            )
        prepare_backend(name)  # imports/op registration happen here, never inside a compiled trace
        self._attention_backend = name

    # ------------------------------------------------------------------------------------------
    # init

    def _rotary_tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.dims.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        t = torch.arange(self.dims.rope_len, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)
        return (
            angles.cos().to(self.compute_dtype)[None, :, None, :],
            angles.sin().to(self.compute_dtype)[None, :, None, :],
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every tensor (nanochat's init, spec §1.7); values set in __init__ are placeholders."""
        cfg, dims = self.config, self.dims
        C, L = dims.n_embd, dims.n_layer
        s = math.sqrt(3.0) / math.sqrt(C)  # uniform bound with std 1/sqrt(C)

        def fill_embedding(emb: nn.Embedding, sampler) -> None:
            # Sample in fp32, then round once to the storage dtype (as nanochat: init, then cast).
            w = torch.empty(emb.weight.shape, dtype=torch.float32, device=emb.weight.device)
            sampler(w)
            emb.weight.copy_(w)

        fill_embedding(self.wte, lambda w: w.normal_(0.0, cfg.wte_init_std))
        self.lm_head.weight.normal_(0.0, cfg.lm_head_init_std)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for lin in (attn.c_q, attn.c_k, attn.c_v):
                lin.weight.uniform_(-s, s)
            attn.c_proj.weight.zero_()
            mlp.c_fc.weight.uniform_(-cfg.fc_init_scale * s, cfg.fc_init_scale * s)
            mlp.c_proj.weight.zero_()
            if attn.ve_gate is not None:
                attn.ve_gate.weight.uniform_(0.0, cfg.ve_gate_init)
        for emb in self.value_embeds.values():
            fill_embedding(emb, lambda w: w.uniform_(-s, s))
        frac = torch.arange(L, dtype=torch.float32, device=self.resid_lambdas.device) / max(L - 1, 1)
        self.resid_lambdas.copy_(cfg.resid_lambda_start + (cfg.resid_lambda_end - cfg.resid_lambda_start) * frac)
        self.x0_lambdas.copy_(cfg.x0_lambda_start + (cfg.x0_lambda_end - cfg.x0_lambda_start) * frac)
        if self.smear_gate is not None:
            self.smear_gate.weight.uniform_(0.0, cfg.smear_gate_init)
            self.smear_lambda.zero_()
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(cfg.backout_init)
        self.init_rotary()

    @torch.no_grad()
    def init_rotary(self) -> None:
        """Recompute the (non-persistent) RoPE tables in place.

        `init_weights` calls it; a checkpoint loader that skips `init_weights` (meta -> to_empty ->
        load_state_dict) must call it, since state dicts do not carry cos/sin.
        """
        cos, sin = self._rotary_tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # ------------------------------------------------------------------------------------------
    # forward

    def _smear(self, x: torch.Tensor, kv_cache: Optional[Any]) -> torch.Tensor:
        """x[t] += smear_lambda * sigmoid(w . x[t][:k]) * x[t-1], from the pre-smear embeddings.

        Position 0 of a sequence is untouched. With a KV cache the cache's view applies it: it
        knows each sequence's previous token (`chatlm.engine.kv_cache`).
        """
        k = self.config.smear_channels
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :k]))  # (B, T, 1)
        if kv_cache is not None:
            return kv_cache.smear(x, gate)
        return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)

    def final_hidden(self, idx: torch.Tensor, kv_cache: Optional[Any] = None) -> torch.Tensor:
        """(B, T, n_embd) normalized hidden states after the last block: what the head reads.

        `kv_cache`: a view of the engine's cache (`chatlm.engine.kv_cache.PrefillView` or
        `DecodeView`), which supplies the positions, smear's previous tokens and attention."""
        B, T = idx.shape
        if T > self.cos.size(1):
            raise ValueError(f"positions up to {T} exceed the RoPE table ({self.cos.size(1)})")
        if kv_cache is None:
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            cos, sin = kv_cache.rotary(self.cos, self.sin, T)
        backend = self.attention_backend

        x = norm(self.wte(idx).to(self.compute_dtype))
        if self.smear_gate is not None:
            x = self._smear(x, kv_cache)
        x0 = x
        x_backout = None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            key = str(i)
            ve = self.value_embeds[key](idx).to(x.dtype) if key in self.value_embeds else None
            x = block(x, ve, cos, sin, backend, kv_cache)
            if i == self.dims.backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        if kv_cache is not None:
            kv_cache.finish(T)
        return norm(x)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Softcapped fp32 logits of hidden states from `final_hidden` (any leading shape).
        Evaluators call it on the few positions they score instead of on every position."""
        return softcap_logits(self.lm_head(x)[..., : self.dims.vocab_size], self.config.softcap)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        kv_cache: Optional[Any] = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, V) in fp32, or the cross-entropy loss when `targets` is given.

        Targets equal to -1 are ignored. loss_reduction 'none' returns a flat (B*T,) vector.
        """
        x = self.final_hidden(idx, kv_cache)
        softcap, vocab = self.config.softcap, self.dims.vocab_size
        if targets is not None and loss_reduction == "mean" and self.fused_loss(x):
            head = self.lm_head  # a plain Linear fuses its matmul too; a Float8Linear hands over logits
            weight = head.weight.to(x.dtype) if type(head) is Linear else None
            return fused_softcap_ce(x, head, targets, softcap, vocab, weight=weight)
        if targets is None:
            return self.head_logits(x)
        logits = self.lm_head(x)[..., :vocab]
        return plain_softcap_ce(logits, targets, softcap, reduction=loss_reduction)

    def fused_loss(self, x: torch.Tensor) -> bool:
        """Whether the mean training loss goes through the fused op (`model.loss_kernel`)."""
        kind = getattr(self.config.loss_kernel, "value", self.config.loss_kernel)
        if kind == "auto":
            return x.is_cuda and self._triton
        return kind == "fused"

    # ------------------------------------------------------------------------------------------
    # accounting

    def num_params(self) -> dict[str, int]:
        """Parameter counts by kind (spec §1.2 table). The smear gate counts as a scalar here."""
        wte = self.wte.weight.numel()
        ve = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = self.lm_head.weight.numel()
        matrices = sum(p.numel() for p in self.blocks.parameters())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        for extra in (self.smear_gate, self.smear_lambda, self.backout_lambda):
            if isinstance(extra, nn.Module):
                scalars += sum(p.numel() for p in extra.parameters())
            elif extra is not None:
                scalars += extra.numel()
        counts = {
            "wte": wte,
            "value_embeds": ve,
            "lm_head": lm_head,
            "transformer_matrices": matrices,
            "scalars": scalars,
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        return counts

    def num_scaling_params(self) -> int:
        """Matrices + lm_head: the N of the tokens:params horizon and the batch/LR transfer."""
        c = self.num_params()
        return c["transformer_matrices"] + c["lm_head"]

    def num_matmul_params(self) -> int:
        """Every Linear weight (incl. lm_head on the padded vocab, VE gates, smear gate)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 * matmul params + sum_l 12 * H * D * min(window_l, T) (PaLM)."""
        d = self.dims
        attn = sum(12 * d.n_head * d.head_dim * min(w, d.sequence_len) for w in d.windows)
        return 6 * self.num_matmul_params() + attn
