"""The checkpoint a chat stage starts from (SFT from a base model, RL from an SFT model): found by
`init_from`, with its meta, its tokenizer (which must have the chat tokens) and its architecture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from chatlm.config import NANOCHAT_SPECIAL_TOKENS, ConfigError, ModelConfig
from chatlm.runtime import checkpoint as ckpt
from chatlm.runtime import lineage
from chatlm.runtime.model_loading import TokenizerMismatch, checkpoint_tokenizer, model_config_from_meta


@dataclass(frozen=True)
class Base:
    """The checkpoint a stage starts from."""

    step_dir: Path
    meta: dict
    tokenizer: Any
    model: ModelConfig

    def lineage(self) -> list[dict]:
        """The chain of the model trained from it: the base's chain, then the base checkpoint."""
        return lineage.extend(self.step_dir, self.meta)


def find_base(init_from: str, tokenizer_dir: Optional[str], stage: str) -> Base:
    """The checkpoint `init_from` names (a run directory or a checkpoint) and its tokenizer; every
    problem is a ConfigError naming `init_from` or `tokenizer_dir`."""
    try:
        step_dir = ckpt.find_checkpoint(init_from)
    except ckpt.CheckpointError as e:
        raise ConfigError("init_from", str(e)) from None
    meta = ckpt.read_meta(step_dir)
    try:
        tok = checkpoint_tokenizer(step_dir, meta, tokenizer_dir)
    except (ckpt.CheckpointError, TokenizerMismatch) as e:
        raise ConfigError("tokenizer_dir" if tokenizer_dir else "init_from", str(e)) from None
    missing = [t for t in NANOCHAT_SPECIAL_TOKENS if t not in tok.special_tokens]
    if missing:
        raise ConfigError(
            "init_from",
            f"{step_dir}: its tokenizer has no {', '.join(missing)}: {stage} renders conversations with "
            "the chat tokens (train the base model with a chatlm tokenizer)",
        )
    return Base(step_dir, meta, tok, model_config_from_meta(meta, str(step_dir / "meta.json")))
