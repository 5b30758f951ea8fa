"""Render conversations into token ids plus a loss mask (nanochat's chat format).

A conversation is `{"messages": [...]}` (or the bare list of messages); each message is
`{"role": "system" | "user" | "assistant", "content": ...}`. Rendered layout:

    <|bos|>
    <|user_start|> user text <|user_end|>
    <|assistant_start|> assistant content <|assistant_end|>
    ... strictly alternating user / assistant ...

The mask says which tokens the model is trained to produce (1) and which are context (0): the
assistant's own words, tool calls and end marker are 1; BOS, user turns, the `<|assistant_start|>`
cue and tool outputs are 0 (tool output comes from the interpreter, not the model, so the model
must not be taught to invent it).

Assistant content is a string or a list of parts:

* `{"type": "text", "text": ...}`           -> text                                     (mask 1)
* `{"type": "python", "text": code}`        -> <|python_start|> code <|python_end|>     (mask 1)
* `{"type": "python_output", "text": out}`  -> <|output_start|> out <|output_end|>      (mask 0)

There is no system role in the format: a leading system message is folded into the first user
message as `system + "\n\n" + user`.
"""

from __future__ import annotations

from typing import Any, Optional

ROLES = ("user", "assistant")


def _messages(conversation: Any) -> list[dict]:
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not isinstance(messages, (list, tuple)):
        raise ValueError(
            f"a conversation is a list of messages or {{'messages': [...]}}, got {type(messages).__name__}"
        )
    return list(messages)


def _fold_system(messages: list[dict]) -> list[dict]:
    """Merge a leading system message into the first user message; reject any other system use."""
    if messages and messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        system, user = messages[0], messages[1]
        if not isinstance(system.get("content"), str) or not isinstance(user.get("content"), str):
            raise ValueError("system and user message contents must be strings")
        merged = dict(user, content=system["content"] + "\n\n" + user["content"])
        messages = [merged] + messages[2:]
    return messages


def render_conversation(tok, conversation: Any, max_tokens: Optional[int] = 2048) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (same length, at most `max_tokens`) of a whole conversation.

    Raises ValueError on a malformed conversation: no messages, roles that do not alternate
    user/assistant starting with user, a non-string user message or an unknown part type.
    """
    messages = _fold_system(_messages(conversation))
    if not messages:
        raise ValueError("a conversation needs at least one user message")

    ids: list[int] = []
    mask: list[int] = []

    def add(tokens, m: int) -> None:
        if isinstance(tokens, int):
            tokens = [tokens]
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    special = tok.encode_special
    add(tok.bos_id, 0)
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        expected = ROLES[i % 2]
        if role != expected:
            raise ValueError(
                f"message {i} has role {role!r}, expected {expected!r} "
                "(roles must alternate user/assistant, starting with user)"
            )
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
            add(special("<|user_start|>"), 0)
            add(tok.encode(content), 0)
            add(special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        if isinstance(content, str):
            add(tok.encode(content), 1)
        elif isinstance(content, (list, tuple)):
            for part in content:
                kind, text = part.get("type"), part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"message {i}: part {kind!r} needs a string 'text'")
                if kind == "text":
                    add(tok.encode(text), 1)
                elif kind == "python":
                    add(special("<|python_start|>"), 1)
                    add(tok.encode(text), 1)
                    add(special("<|python_end|>"), 1)
                elif kind == "python_output":
                    add(special("<|output_start|>"), 0)
                    add(tok.encode(text), 0)
                    add(special("<|output_end|>"), 0)
                else:
                    raise ValueError(f"message {i}: unknown part type {kind!r}")
        else:
            raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
        add(special("<|assistant_end|>"), 1)

    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tok, conversation: Any, max_tokens: Optional[int] = None) -> list[int]:
    """Prompt ids for sampling the assistant's reply: the conversation without its final assistant
    message, followed by `<|assistant_start|>` (used by RL and the evaluators).

    Not truncated by default: cutting the end off a prompt would drop the very question asked.
    """
    messages = _fold_system(_messages(conversation))
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
    ids, _ = render_conversation(tok, messages[:-1], max_tokens=max_tokens)
    ids.append(tok.encode_special("<|assistant_start|>"))
    return ids


class _Structure:
    """A stand-in tokenizer that encodes nothing: rendering with it checks only a conversation's shape."""

    bos_id = 0

    def encode(self, text: str) -> list[int]:
        return []

    def encode_special(self, name: str) -> int:
        return 0


def conversation_problem(conversation: Any) -> Optional[str]:
    """What is wrong with a conversation's shape (the message `render_conversation` would raise),
    or None when it renders; a conversation must also end with an assistant message to teach anything."""
    try:
        messages = _fold_system(_messages(conversation))
        render_conversation(_Structure(), messages, max_tokens=None)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        return str(e) or type(e).__name__
    if messages[-1].get("role") != "assistant":
        return "the last message must be the assistant's (nothing would be trained on)"
    return None
