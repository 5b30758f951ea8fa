"""From request bodies to prompt token ids: the chat template for /v1/chat/completions, plain text
(after BOS) or token ids for /v1/completions. Every refusal is an `APIError` naming the parameter."""

from __future__ import annotations

from typing import Any, Sequence

from chatlm.server.schemas import APIError, Message
from chatlm.tokenizer.chat_format import render_for_completion

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def check_chars(texts: Sequence[str], per_item: int, total: int, param: str) -> None:
    for i, text in enumerate(texts):
        if len(text) > per_item:
            raise APIError(400, f"{param}[{i}] has {len(text)} characters; at most {per_item} are allowed", param=param)
    if sum(map(len, texts)) > total:
        raise APIError(400, f"{param} hold {sum(map(len, texts))} characters together; at most {total}", param=param)


def chat_prompt(tok: Any, messages: Sequence[Message]) -> list[int]:
    """BOS, the conversation in nanochat's chat format, and `<|assistant_start|>` for the reply."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    turns = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; this model takes system, user and assistant messages",
                param=f"messages[{i}].role",
                code="unsupported_value",
            )
        if role == "system" and i != 0:
            raise APIError(400, "a system message may only come first", param=f"messages[{i}].role")
        turns.append({"role": role, "content": m.text()})
    if turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's: the model answers it", param="messages")
    try:
        return render_for_completion(tok, [*turns, {"role": "assistant", "content": ""}])
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def completion_prompts(tok: Any, prompt: Any, vocab_size: int) -> list[list[int]]:
    """The prompts of a /v1/completions body: text (BOS + its tokens) or token ids (as given)."""
    if isinstance(prompt, str):
        return [[tok.bos_id, *tok.encode(prompt)]]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        return [[tok.bos_id, *tok.encode(p)] for p in prompt]
    rows = [prompt] if isinstance(prompt[0], int) else prompt
    for row in rows:
        if not row:
            raise APIError(400, "a token prompt must hold at least one token", param="prompt")
        if min(row) < 0 or max(row) >= vocab_size:
            raise APIError(400, f"token ids must be in [0, {vocab_size})", param="prompt")
    return [list(row) for row in rows]
