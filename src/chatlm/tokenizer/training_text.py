"""The text a tokenizer is trained on: documents from the train shards of each source."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from chatlm.data.shards import iter_documents


def training_texts(shard_sets: list[tuple[list[Path], float]], max_chars: int) -> Iterator[str]:
    """Documents from each source's train shards; the character budget is split by weight."""
    total = sum(w for _, w in shard_sets)
    for files, weight in shard_sets:
        budget = int(max_chars * weight / total)
        used = 0
        for text in iter_documents(files):
            if used >= budget:
                break
            used += len(text)
            yield text
