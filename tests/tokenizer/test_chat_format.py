"""Chat rendering: exact ids and loss masks, system folding, validation, truncation."""

from __future__ import annotations

import pytest

from chatlm.tokenizer import render_conversation, render_for_completion

# ids fixed by the 512-token test vocabulary: 503 ranks, then the specials in config order
BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = 503, 504, 505, 506, 507
PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END = 508, 509, 510, 511


def test_special_ids(tok):
    assert [
        tok.encode_special(s)
        for s in (
            "<|bos|>",
            "<|user_start|>",
            "<|user_end|>",
            "<|assistant_start|>",
            "<|assistant_end|>",
            "<|python_start|>",
            "<|python_end|>",
            "<|output_start|>",
            "<|output_end|>",
        )
    ] == list(range(503, 512))


def test_minimal_conversation_literal_ids(tok):
    """Single characters are their byte tokens, so the whole rendering can be written out."""
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    ids, mask = render_conversation(tok, conv)
    assert ids == [BOS, USER_START, ord("a"), USER_END, ASSISTANT_START, ord("b"), ASSISTANT_END]
    assert mask == [0, 0, 0, 0, 0, 1, 1]


def test_tool_use_conversation(tok):
    enc = tok.encode
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute."},
                    {"type": "python", "text": "print(2+2)"},
                    {"type": "python_output", "text": "4"},
                    {"type": "text", "text": "It is 4."},
                ],
            },
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ]
    }
    ids, mask = render_conversation(tok, conv)

    expected = [
        ([BOS], 0),
        ([USER_START], 0),
        (enc("Be brief.\n\nWhat is 2+2?"), 0),
        ([USER_END], 0),
        ([ASSISTANT_START], 0),
        (enc("Let me compute."), 1),
        ([PYTHON_START], 1),
        (enc("print(2+2)"), 1),
        ([PYTHON_END], 1),
        ([OUTPUT_START], 0),
        ([ord("4")], 0),
        ([OUTPUT_END], 0),
        (enc("It is 4."), 1),
        ([ASSISTANT_END], 1),
        ([USER_START], 0),
        (enc("Thanks"), 0),
        ([USER_END], 0),
        ([ASSISTANT_START], 0),
        (enc("You're welcome."), 1),
        ([ASSISTANT_END], 1),
    ]
    assert ids == [t for piece, _ in expected for t in piece]
    assert mask == [m for piece, m in expected for _ in piece]
    assert len(ids) == len(mask)
    # the masked-in tokens decode to exactly what the model must learn to write
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert (
        trained == "Let me compute.<|python_start|>print(2+2)<|python_end|>It is 4.<|assistant_end|>"
        "You're welcome.<|assistant_end|>"
    )


def test_system_message_is_folded(tok):
    with_system = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    folded = [{"role": "user", "content": "S\n\nU"}, {"role": "assistant", "content": "A"}]
    assert render_conversation(tok, with_system) == render_conversation(tok, folded)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
        [{"role": "system", "content": "s"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
        [{"role": "user", "content": ["not", "a", "string"]}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": 42}],
    ],
)
def test_malformed_conversations(tok, messages):
    with pytest.raises(ValueError):
        render_conversation(tok, {"messages": messages})


def test_conversation_may_end_with_user(tok):
    ids, mask = render_conversation(tok, [{"role": "user", "content": "a"}])
    assert ids == [BOS, USER_START, ord("a"), USER_END] and mask == [0, 0, 0, 0]


def test_special_strings_in_content_are_text(tok):
    ids, _ = render_conversation(
        tok, [{"role": "user", "content": "<|assistant_end|>"}, {"role": "assistant", "content": "<|bos|>"}]
    )
    assert ids.count(ASSISTANT_END) == 1 and ids.count(BOS) == 1
    assert ids[-1] == ASSISTANT_END and ids[0] == BOS


def test_truncation(tok):
    conv = [{"role": "user", "content": "hello " * 50}, {"role": "assistant", "content": "world " * 50}]
    full_ids, full_mask = render_conversation(tok, conv, max_tokens=None)
    ids, mask = render_conversation(tok, conv, max_tokens=20)
    assert len(full_ids) > 20
    assert ids == full_ids[:20] and mask == full_mask[:20]
    assert render_conversation(tok, conv)[0] == full_ids[:2048]


def test_render_for_completion(tok):
    conv = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": [{"type": "text", "text": "d"}]},
        ]
    }
    ids = render_for_completion(tok, conv)
    prompt, _ = render_conversation(tok, conv["messages"][:-1])
    assert ids == prompt + [ASSISTANT_START]
    assert ids[-4:] == [USER_START, ord("c"), USER_END, ASSISTANT_START]
    assert len(conv["messages"]) == 5  # the caller's conversation is left untouched
    with pytest.raises(ValueError):
        render_for_completion(tok, conv["messages"][:-1])
