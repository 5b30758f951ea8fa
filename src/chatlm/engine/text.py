"""Incremental text of a generated sequence: UTF-8-safe deltas and stop strings.

Byte-level BPE tokens can end inside a multi-byte character; decoding them alone gives U+FFFD.
`TextStream` decodes the tokens since the last clean boundary and withholds text that ends in
U+FFFD until the character completes (or 8 tokens have gone by: then the bytes really are invalid).
With stop strings it also withholds any tail that could be the start of one, so a streamed client
never sees part of a stop string; the text ends just before the first stop string found.
"""

from __future__ import annotations

from typing import Any, Sequence

_INCOMPLETE = "\ufffd"
_MAX_PENDING = 8


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` handed out
        self._pending: list[int] = []

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text that is now safe to show, whether a stop string was hit)."""
        if self.tokenizer is None:
            return "", False
        self._pending.append(token)
        piece = self.tokenizer.decode(self._pending)
        if piece.endswith(_INCOMPLETE) and len(self._pending) < _MAX_PENDING:
            return "", False
        self._pending = []
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        if self.stop:
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """Everything not yet handed out (the sequence has ended)."""
        if self._pending and self.tokenizer is not None:
            self.text += self.tokenizer.decode(self._pending)
            self._pending = []
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if s.startswith(self.text[-n:]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent : upto], upto
        return out
