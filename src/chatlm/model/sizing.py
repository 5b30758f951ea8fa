"""Everything the GPT's shape is derived from, computed once from a ModelConfig.

nanochat derives the width, head count, windows and special layers from `--depth` in several
places (base_train's `build_model_meta`, `GPT.__init__`, `_compute_window_sizes`). Here it is one
pure function, so the training loop, the FLOP accounting, checkpoint metadata and the tests all read
the same numbers, and an impossible configuration fails before any tensor is allocated, with the
offending config key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from chatlm.config import ConfigError, ModelConfig
from chatlm.config.model import check_positive_fields, default_short_window


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ModelDims:
    """The derived architecture. Windows count *previous* tokens a query may see (self excluded)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    sequence_len: int
    vocab_size: int
    padded_vocab_size: int
    short_window: int
    windows: tuple[int, ...]
    ve_layers: frozenset[int]
    backout_layer: Optional[int]
    rope_len: int

    @property
    def long_window(self) -> int:
        return self.sequence_len

    def has_ve(self, layer_idx: int) -> bool:
        return layer_idx in self.ve_layers

    def window_chars(self) -> str:
        """The per-layer pattern actually used, e.g. 'SSSLSSSLSSSL' (handy for logs)."""
        return "".join("L" if w >= self.sequence_len else "S" for w in self.windows)

    def as_dict(self) -> dict:
        """Plain builtins, for `derived:` in config.resolved.yaml and checkpoint metadata."""
        return {
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "head_dim": self.head_dim,
            "sequence_len": self.sequence_len,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "short_window": self.short_window,
            "windows": list(self.windows),
            "ve_layers": sorted(self.ve_layers),
            "backout_layer": self.backout_layer,
            "rope_len": self.rope_len,
        }


def model_width(depth: int, aspect_ratio: int, head_dim: int) -> int:
    """C = depth * aspect_ratio rounded *up* to a multiple of head_dim, so D is exactly head_dim."""
    return _ceil_div(depth * aspect_ratio, head_dim) * head_dim


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Embedding/unembedding rows are padded up to a multiple (64) for matmul-friendly shapes."""
    return _ceil_div(vocab_size, multiple) * multiple


def layer_windows(n_layer: int, pattern: str, short_window: int, long_window: int) -> tuple[int, ...]:
    """The pattern (S/L) tiled over the layers; the last layer is always full context (L)."""
    pattern = pattern.upper()
    chars = [pattern[i % len(pattern)] for i in range(n_layer)]
    chars[-1] = "L"
    return tuple(short_window if c == "S" else long_window for c in chars)


def value_embed_layers(n_layer: int) -> frozenset[int]:
    """Alternating layers, always including the last one: i % 2 == (L - 1) % 2."""
    return frozenset(i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2)


def derive_dims(cfg: ModelConfig, vocab_size: Optional[int] = None) -> ModelDims:
    """All derived model dimensions. `vocab_size` (the tokenizer's) wins over `cfg.vocab_size`.

    The checks repeat some of ModelConfig.__post_init__ on purpose: OmegaConf-merged configs can
    be edited after construction, and this is the last point before tensors get shapes.
    """
    vocab = vocab_size if vocab_size is not None else cfg.vocab_size
    if vocab is None or vocab < 1:
        raise ConfigError("model.vocab_size", f"needs a positive vocabulary size (from the tokenizer), got {vocab}")
    check_positive_fields(cfg)
    if cfg.head_dim % 2:
        raise ConfigError("model.head_dim", f"must be even (RoPE rotates channel halves), got {cfg.head_dim}")

    L, T = cfg.depth, cfg.sequence_len
    C = model_width(L, cfg.aspect_ratio, cfg.head_dim)
    if C % cfg.head_dim:  # cannot happen with model_width, kept as a guard for future overrides
        raise ConfigError("model.head_dim", f"does not divide the model width {C}")
    n_head = C // cfg.head_dim
    n_kv_head = n_head if cfg.n_kv_head is None else cfg.n_kv_head
    if not 1 <= n_kv_head <= n_head or n_head % n_kv_head:
        raise ConfigError("model.n_kv_head", f"must divide n_head={n_head} (GQA groups), got {n_kv_head}")

    pattern = cfg.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ConfigError("model.window_pattern", f"must be a non-empty string of S and L, got {cfg.window_pattern!r}")
    derived = default_short_window(T, cfg.short_window_divisor, cfg.window_round)
    if cfg.short_window is not None:
        if not 1 <= cfg.short_window <= max(T, derived):
            raise ConfigError(
                "model.short_window",
                f"must be in [1, {max(T, derived)}] (the larger of sequence_len "
                f"and the derived window), got {cfg.short_window}",
            )
        short = cfg.short_window
    else:
        short = derived

    if cfg.value_embeds and cfg.ve_gate_channels > C:
        raise ConfigError("model.ve_gate_channels", f"must be <= n_embd={C}, got {cfg.ve_gate_channels}")
    if cfg.smear and not 1 <= cfg.smear_channels <= C:
        raise ConfigError("model.smear_channels", f"must be in [1, n_embd={C}], got {cfg.smear_channels}")
    backout_layer = None
    if cfg.backout:
        backout_layer = L // 2 if cfg.backout_layer is None else cfg.backout_layer
        if not 0 <= backout_layer < L:
            raise ConfigError("model.backout_layer", f"must be in [0, depth={L}), got {backout_layer}")
    if cfg.softcap < 0:
        raise ConfigError("model.softcap", f"must be >= 0 (0 disables it), got {cfg.softcap}")

    return ModelDims(
        n_layer=L,
        n_embd=C,
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=cfg.head_dim,
        sequence_len=T,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, cfg.vocab_pad_multiple),
        short_window=short,
        windows=layer_windows(L, pattern, short, T),
        ve_layers=value_embed_layers(L) if cfg.value_embeds else frozenset(),
        backout_layer=backout_layer,
        rope_len=cfg.rope_table_factor * T,
    )
