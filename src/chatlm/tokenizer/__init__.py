"""Tokenizer: byte-level BPE trained with rustbpe and run with tiktoken, plus chat rendering.

`Tokenizer.load(dir)` is all a training or inference stage needs; `train_tokenizer` is used by
`python -m chatlm.tokenize`, which writes that directory.
"""

from chatlm.tokenizer.bpe import (
    CREATE_COMMAND,
    CappedTexts,
    Tokenizer,
    compression_report,
    read_tiktoken_ranks,
    reference_encoding,
    tokenizer_dir,
    train_tokenizer,
)
from chatlm.tokenizer.chat_format import render_conversation, render_for_completion

__all__ = [
    "CREATE_COMMAND",
    "CappedTexts",
    "Tokenizer",
    "compression_report",
    "read_tiktoken_ranks",
    "reference_encoding",
    "render_conversation",
    "render_for_completion",
    "tokenizer_dir",
    "train_tokenizer",
]
