"""The official `openai` client against `python -m chatlm.serve` (a real subprocess on a free port):
greedy answers equal the engine's own, streaming equals non-streaming, usage adds up, the models
list, and the client's error classes for bad requests, after which the server still serves."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import chat_prompt_ids, chat_stops, engine_answer

openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def test_models_list_names_the_served_checkpoint(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == ["smoke-step5"]  # <run name>-step<N> of the smoke run
    card = httpx.get(served.url + "/v1/models/smoke-step5").json()
    assert card["max_model_len"] == 128 and card["root"].endswith("checkpoints/step_000005")
    assert card["root"].startswith(str(served.run))


def test_greedy_chat_equals_the_engine(client, model_name, loaded):
    tok = loaded.tokenizer
    want, n, reason = engine_answer(loaded, chat_prompt_ids(tok, HELLO[0]["content"]), 40, chat_stops(tok))
    r = client.chat.completions.create(model=model_name, messages=HELLO, temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.model == model_name and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert want.strip() and r.choices[0].finish_reason == reason
    prompt = len(chat_prompt_ids(tok, HELLO[0]["content"]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, n, prompt + n)


def test_streaming_chat_equals_non_streaming(client, model_name, loaded):
    kwargs = dict(model=model_name, messages=HELLO, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(served):
    body = {"messages": HELLO, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert "usage" not in events[1]  # no include_usage: no usage key at all


def test_greedy_completion_equals_the_engine(client, model_name, loaded):
    tok = loaded.tokenizer
    prompt = "The capital of France is"
    want, n, reason = engine_answer(loaded, [tok.bos_id, *tok.encode(prompt)], 16, (tok.bos_id,))
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want and r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == n and r.usage.prompt_tokens == 1 + len(tok.encode(prompt))
    streamed = client.completions.create(model=model_name, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_n_choices_and_seeds(client, model_name):
    kwargs = dict(model=model_name, messages=HELLO, temperature=1.0, max_tokens=12, seed=7)
    a = client.chat.completions.create(**kwargs, n=3)
    b = client.chat.completions.create(**kwargs, n=3)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: repeats
    assert len({c.message.content for c in a.choices}) > 1  # seed, seed+1, seed+2 differ
    one = client.chat.completions.create(**{**kwargs, "seed": 8})
    assert one.choices[0].message.content == a.choices[1].message.content  # choice i uses seed + i
    stream = client.chat.completions.create(**kwargs, n=3, stream=True)
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_stop_strings_cut_the_answer(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=HELLO, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    cut = text[len(text) // 2 :].strip()[:3]
    assert cut
    r = client.chat.completions.create(model=model_name, messages=HELLO, temperature=0, max_tokens=40, stop=[cut])
    assert r.choices[0].message.content == text[: text.index(cut)] and r.choices[0].finish_reason == "stop"


BAD = [
    ("bad temperature", dict(temperature=-1), "temperature"),
    ("temperature above 2", dict(temperature=2.5), "temperature"),
    ("negative max_tokens", dict(max_tokens=-5), "max_tokens"),
    ("huge max_tokens", dict(max_tokens=10**7), "max_tokens"),
    ("huge max_completion_tokens", dict(max_completion_tokens=10**7), "max_completion_tokens"),
    ("zero top_p", dict(top_p=0), "top_p"),
    ("unsupported tools", dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("unsupported logprobs", dict(logprobs=True), "logprobs"),
    ("unsupported penalty", dict(presence_penalty=0.5), "presence_penalty"),
    ("unknown argument", dict(extra_body={"frobnicate": 1}), "frobnicate"),
    ("too many stop strings", dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stream_options without stream", dict(stream_options={"include_usage": True}), "stream_options"),
    ("n beyond the batch", dict(n=33), "n"),
]


@pytest.mark.parametrize("name,kwargs,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_raise_bad_request_error(client, model_name, name, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name, messages=HELLO, **kwargs)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert err.value.body["code"] == "model_not_found" and "gpt-4o" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_prompt_longer_than_the_context(client, model_name):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "word " * 400}])
    assert err.value.body["code"] == "context_length_exceeded" and "128" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt=list(range(200)))


def test_conversation_shape_errors(client, model_name):
    cases = [
        ([], "messages"),
        ([{"role": "assistant", "content": "hi"}], "messages"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role"),
    ]
    for messages, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model_name, messages=messages)
        assert err.value.body["param"] == param, (messages, err.value.body)


RAW = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    (b'{"model": "x"}', 400, "messages", "missing_required_parameter"),
    (b'{"messages": "hi"}', 400, "messages", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}', 400, "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}', 400, "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream", "invalid_value"),
]


@pytest.mark.parametrize("body,status,param,code", RAW)
def test_malformed_bodies_get_openai_error_bodies(served, body, status, param, code):
    r = httpx.post(served.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_unknown_routes_and_methods_answer_in_the_same_shape(served):
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(served.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_still_serving_after_the_errors(served, client, model_name):
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    r = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert served.proc.poll() is None
