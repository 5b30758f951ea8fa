"""The `data/` and `tokenizer/` groups: pretraining shard sets and the BPE tokenizer."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import List, Optional

from chatlm.config.fields import setting
from chatlm.errors import ConfigError


class DataKind(str, enum.Enum):
    embedded = "embedded"
    offline_registry = "offline_registry"
    climbmix = "climbmix"
    fineweb_edu = "fineweb_edu"
    synthetic = "synthetic"
    local = "local"


@dataclass
class DataSourceConfig:
    """One shard set: parquet files with a `text` column; the last shard is validation."""

    kind: DataKind = setting(
        DataKind.embedded,
        "embedded | offline_registry | climbmix | fineweb_edu | synthetic | "
        "local (a directory of your own shards: set path)",
    )
    weight: float = setting(1.0, "relative share of the training tokens drawn from this source (> 0)")
    path: Optional[str] = setting(None, "kind=local: the shard directory; other kinds: override where they are built")
    url: Optional[str] = setting(None, "downloaded kinds: base URL of the shards (null = the published location)")
    num_shards: int = setting(-1, "train shards to download (-1 = all); the validation shard always comes too")
    sha256_manifest: Optional[str] = setting(None, "a `sha256sum` file of the shards, checked after download")
    download_workers: int = setting(4, "parallel shard downloads")
    wait_timeout_s: float = setting(3600.0, "seconds the other ranks wait for the main rank to prepare the shards")


@dataclass
class DataConfig:
    """Pretraining data: one or more weighted shard sets, packed into BOS-aligned rows."""

    name: str = setting("embedded", "tag used in comparisons")
    sources: List[DataSourceConfig] = setting(
        help="weighted shard sets (each refill comes from the source furthest below its share)",
        factory=lambda: [DataSourceConfig()],
    )
    doc_buffer: int = setting(1000, "documents held for best-fit packing per rank (nanochat: 1000)")
    tokenizer_threads: int = setting(4, "threads tokenizing each row group")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources", "needs at least one source")
        if any(not s.weight > 0 for s in self.sources):
            raise ConfigError("data.sources", "every source weight must be > 0")
        if self.doc_buffer < 1:
            raise ConfigError("data.doc_buffer", f"must be >= 1, got {self.doc_buffer}")
        if self.tokenizer_threads < 1:
            raise ConfigError("data.tokenizer_threads", f"must be >= 1, got {self.tokenizer_threads}")


NANOCHAT_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

NANOCHAT_SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with rustbpe, used through tiktoken (nanochat's tokenizer)."""

    name: str = setting("bpe32k", "artifact name under paths.tokenizer_dir")
    vocab_size: int = setting(32768, "total ids, special tokens included (nanochat: 32768)")
    split_pattern: str = setting(
        NANOCHAT_SPLIT_PATTERN, "pre-tokenization regex (GPT-4's, numbers in runs of 1-2 digits, as nanochat)"
    )
    special_tokens: List[str] = setting(
        help="special tokens appended after the merges (nanochat's 9)", factory=lambda: list(NANOCHAT_SPECIAL_TOKENS)
    )
    max_chars: int = setting(2_000_000_000, "characters of training text read at most (nanochat: 2e9)")
    doc_cap: int = setting(10_000, "characters taken from each document at most (nanochat: 10,000)")
    dir: Optional[str] = setting(None, "the tokenizer directory; null = <paths.tokenizer_dir>/<name>")

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(self.special_tokens):
            raise ConfigError(
                "tokenizer.vocab_size",
                f"must be >= 256 bytes + {len(self.special_tokens)} special tokens, got {self.vocab_size}",
            )
