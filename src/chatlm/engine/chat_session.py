"""A conversation with a model, for the terminal chat (and anything else that keeps one going).

The history is kept as token ids, as nanochat's chat_cli does: BOS, then per turn
`<|user_start|> text <|user_end|> <|assistant_start|>` and the reply's own tokens (tool calls and
their forced outputs included) closed by `<|assistant_end|>`. Re-encoding the reply's text would
turn its special tokens into plain characters. When the history no longer leaves room for an
answer, the oldest turns are dropped (whole turns; the newest question always stays).

In `complete` mode (base models) every prompt is continued on its own: BOS + text, stopping at
BOS (a base model's end of document).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from chatlm.engine.engine import Engine, SamplingParams


class ChatSession:
    def __init__(self, engine: Engine, tokenizer: Any, *, mode: str, params: SamplingParams, system: str = ""):
        if mode not in ("chat", "complete"):
            raise ValueError(f"mode must be chat or complete, got {mode!r}")
        self.engine, self.tok, self.mode, self.system = engine, tokenizer, mode, system
        special = tokenizer.encode_special if mode == "chat" else None
        self.user_start = special("<|user_start|>") if special else None
        self.user_end = special("<|user_end|>") if special else None
        self.assistant_start = special("<|assistant_start|>") if special else None
        self.assistant_end = special("<|assistant_end|>") if special else None
        stops = (tokenizer.bos_id,) if mode == "complete" else (self.assistant_end, tokenizer.bos_id)
        self.params = SamplingParams(**{**params.__dict__, "stop_token_ids": tuple(stops)})
        self.turns: list[list[int]] = []  # each finished turn's ids (user part + reply)
        self.dropped_turns = 0
        self.answers = 0

    def clear(self) -> None:
        self.turns = []

    def _prompt(self, text: str) -> list[int]:
        bos = self.tok.bos_id
        if self.mode == "complete":
            return [bos, *self.tok.encode(text)]
        if not self.turns and self.system:
            text = f"{self.system}\n\n{text}"
        new = [self.user_start, *self.tok.encode(text), self.user_end, self.assistant_start]
        room = self.engine.max_len - self.params.max_tokens  # leave room for a whole answer
        while self.turns and 1 + sum(map(len, self.turns)) + len(new) > room:
            self.turns.pop(0)
            self.dropped_turns += 1
        return [bos, *(t for turn in self.turns for t in turn), *new]

    def reply(self, text: str, seed: Optional[int] = None) -> Iterator[str]:
        """Stream the answer's text; the history holds the turn once the answer is complete."""
        prompt = self._prompt(text)
        if seed is None and self.params.seed is not None:
            seed = self.params.seed + self.answers
        params = SamplingParams(**{**self.params.__dict__, "seed": seed})
        rid = self.engine.add(prompt, params)
        tokens: list[int] = []
        finished = None
        try:
            for event in self.engine.stream():
                if event.request_id != rid:
                    continue
                if event.token is not None:
                    tokens.append(event.token)
                if event.text:
                    yield event.text
                if event.finish_reason:
                    finished = event.finish_reason
        finally:
            if finished is None:  # the caller stopped reading (Ctrl-C): free the slot
                self.engine.cancel(rid)
                for _ in self.engine.stream():
                    pass
        self.answers += 1
        if self.assistant_end is not None and finished is not None:  # chat mode
            user = prompt[1 + sum(map(len, self.turns)) :]
            self.turns.append([*user, *tokens, self.assistant_end])
