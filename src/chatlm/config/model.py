"""The `model/` group: the GPT architecture. Width, heads and windows derive from `depth`."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from chatlm.config.fields import setting
from chatlm.errors import ConfigError


class AttentionBackend(str, enum.Enum):
    auto = "auto"
    fa4 = "fa4"
    flex = "flex"
    sdpa = "sdpa"


class KernelChoice(str, enum.Enum):
    """A fused kernel or nanochat's plain expression (auto: fused on CUDA with Triton)."""

    auto = "auto"
    fused = "fused"
    plain = "plain"


class QKVMatmul(str, enum.Enum):
    auto = "auto"
    fused = "fused"
    separate = "separate"


def default_short_window(sequence_len: int, divisor: int, round_to: int) -> int:
    """ceil(T / (divisor * round_to)) * round_to in integer math: T=2048 -> 512, T=513 -> 256.

    This is nanochat's `-(-long_window // 4 // 128) * 128`, where the unary minus binds first. It is
    not capped at T: for tiny contexts (T=64 -> 128) the window is wider than the context, the same
    as full causal attention in training, but not when generating past T (nanochat generates up to
    the RoPE table, 10 x T). FLOP accounting counts min(window, T).
    """
    return -(-sequence_len // (divisor * round_to)) * round_to


POSITIVE_FIELDS = (
    "depth",
    "aspect_ratio",
    "head_dim",
    "sequence_len",
    "vocab_pad_multiple",
    "short_window_divisor",
    "window_round",
    "rope_table_factor",
)


def check_positive_fields(cfg: Any) -> None:
    """Refuse a ModelConfig (or one edited after construction) with a size field below 1."""
    for key in POSITIVE_FIELDS:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}", f"must be >= 1, got {getattr(cfg, key)}")


@dataclass
class ModelConfig:
    """GPT architecture (nanochat's gpt.py). Every constant nanochat hard-codes is a field with its value."""

    name: str = setting("d20", "tag used in run names and comparisons", architecture=False)
    depth: int = setting(20, "transformer blocks, the one dial: width, heads, batch, LRs and horizon follow from it")
    aspect_ratio: int = setting(64, "width = depth x aspect_ratio rounded up to a multiple of head_dim (nanochat: 64)")
    head_dim: int = setting(128, "channels per attention head (nanochat: 128)")
    n_kv_head: Optional[int] = setting(
        None, "key/value heads for grouped-query attention; null = as many as query heads"
    )
    sequence_len: int = setting(2048, "context length T in tokens (nanochat: 2048)")
    vocab_size: Optional[int] = setting(None, "vocabulary size; null = the tokenizer's (nanochat: 32768)")
    vocab_pad_multiple: int = setting(64, "embedding and lm_head rows are padded up to a multiple of this")
    window_pattern: str = setting(
        "SSSL", "per-layer attention windows tiled over the layers (S short, L full); the last layer is always L"
    )
    short_window: Optional[int] = setting(
        None, "tokens an S layer sees; null = ceil(T / (divisor x round)) x round (512 at T=2048)"
    )
    short_window_divisor: int = setting(4, "the short window is about T / this (nanochat: 4)")
    window_round: int = setting(128, "the short window is rounded up to a multiple of this (nanochat: 128)")
    softcap: float = setting(15.0, "logit softcap c: logits = c * tanh(logits / c); 0 disables (nanochat: 15)")
    qk_scale: float = setting(1.2, "q and k are multiplied by this after QK-norm (nanochat: 1.2)")
    rope_base: float = setting(100000.0, "RoPE base theta (nanochat: 100,000)")
    rope_table_factor: int = setting(10, "precomputed RoPE positions = this x sequence_len (generation beyond T)")
    value_embeds: bool = setting(True, "value embeddings on alternating layers, the last included (ResFormer)")
    ve_gate_channels: int = setting(12, "input channels of the value-embedding gate (nanochat: 12)")
    ve_gate_range: float = setting(3.0, "value-embedding gate = range x sigmoid(.) (nanochat: 3)")
    ve_gate_init: float = setting(0.02, "value-embedding gate weights start uniform in [0, this]")
    smear: bool = setting(True, "mix the previous token's embedding into each position (smear gate)")
    smear_channels: int = setting(24, "input channels of the smear gate (nanochat: 24)")
    smear_gate_init: float = setting(0.02, "smear gate weights start uniform in [0, this]")
    backout: bool = setting(True, "subtract a learned fraction of a middle layer's output before the head")
    backout_layer: Optional[int] = setting(None, "the layer whose output is backed out; null = depth // 2")
    backout_init: float = setting(0.2, "initial backout fraction (nanochat: 0.2)")
    wte_init_std: float = setting(0.8, "token embedding init std (nanochat: 0.8)")
    lm_head_init_std: float = setting(0.001, "lm_head init std (nanochat: 0.001)")
    fc_init_scale: float = setting(0.4, "MLP c_fc init bound, as a fraction of sqrt(3 / width) (nanochat: 0.4)")
    resid_lambda_start: float = setting(1.15, "residual scale of the first layer, ramped linearly to the last")
    resid_lambda_end: float = setting(1.05, "residual scale of the last layer")
    x0_lambda_start: float = setting(0.20, "x0 (embedding) skip scale of the first layer, ramped to the last")
    x0_lambda_end: float = setting(0.05, "x0 skip scale of the last layer")
    attention_backend: AttentionBackend = setting(
        AttentionBackend.auto,
        "auto | fa4 | flex | sdpa: fa4 on Hopper/Blackwell when installed, else flex on CUDA, sdpa on CPU",
        architecture=False,
    )
    loss_kernel: KernelChoice = setting(
        KernelChoice.auto,
        "auto | fused | plain: lm_head + softcapped CE as one fused op (auto: on CUDA with Triton)",
        architecture=False,
    )
    qkv_matmul: QKVMatmul = setting(
        QKVMatmul.auto, "auto | fused | separate: q, k and v from one matmul (auto: on CUDA)", architecture=False
    )
    rope_kernel: KernelChoice = setting(
        KernelChoice.auto,
        "auto | fused | plain: RoPE + QK-norm as one Triton kernel (auto: on CUDA with Triton)",
        architecture=False,
    )

    def __post_init__(self) -> None:
        check_positive_fields(self)
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise ConfigError(
                "model.window_pattern",
                f"must be a non-empty string of S (short) and L (long), got {self.window_pattern!r}",
            )
        if self.short_window is not None:
            # nanochat's derived window may exceed T (128 at T < 128); an explicit one may not go beyond both
            derived = default_short_window(self.sequence_len, self.short_window_divisor, self.window_round)
            top = max(self.sequence_len, derived)
            if not 1 <= self.short_window <= top:
                raise ConfigError(
                    "model.short_window",
                    f"must be in [1, {top}] (the larger of sequence_len and the derived window), got "
                    f"{self.short_window}",
                )
        if self.backout_layer is not None and not 0 <= self.backout_layer < self.depth:
            raise ConfigError("model.backout_layer", f"must be in [0, depth={self.depth}), got {self.backout_layer}")
        if self.softcap < 0:
            raise ConfigError("model.softcap", f"must be >= 0 (0 disables it), got {self.softcap}")
