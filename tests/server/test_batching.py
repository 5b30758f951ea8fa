"""Continuous batching through HTTP: 32 concurrent streaming clients share decode steps and all
finish; a full queue answers 429 with Retry-After; a client that hangs up frees its slot; an engine
failure fails its requests with a 500 body and the server serves the next one."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from chatlm.engine import Engine
from tests.server.conftest import SlowEngine, chat_prompt_ids, chat_stops, engine_answer, metric, wait_for

openai = pytest.importorskip("openai")


def test_32_concurrent_streams_share_decode_steps(served, loaded):
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tok = loaded.tokenizer
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(32)]
    steps_before = metric(served.url, "chatlm_decode_steps_total")

    async def one(i: int) -> tuple[str, int, str]:
        stream = await client.chat.completions.create(
            model="smoke-step5",
            messages=[{"role": "user", "content": questions[i]}],
            temperature=0,
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        return text, usage.completion_tokens, finish

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    # every client got its own greedy answer, whatever its batch mates were
    for i in (0, 13, 31):
        want, n, reason = engine_answer(loaded, chat_prompt_ids(tok, questions[i]), 48, chat_stops(tok))
        assert results[i] == (want, n, reason)
    assert all(finish in ("stop", "length") and n >= 1 for _, n, finish in results)
    total = sum(n for _, n, _ in results)
    steps = metric(served.url, "chatlm_decode_steps_total") - steps_before
    assert metric(served.url, "chatlm_max_requests_running") > 1
    assert steps < total / 4  # shared steps: far fewer steps than tokens
    # the batch-size histogram saw steps with more than 16 sequences in them
    many = metric(served.url, 'chatlm_batch_size_bucket{le="+Inf"}') - metric(
        served.url, 'chatlm_batch_size_bucket{le="16"}'
    )
    assert many > 0
    assert metric(served.url, "chatlm_num_requests_running") == 0


def test_a_full_queue_answers_429_with_retry_after(start_server):
    SlowEngine.delay = 0.03
    s = start_server(SlowEngine, max_batch=1, max_queue=1, retry_after_s=3)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=s.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            second = c.build_request("POST", "/v1/chat/completions", json={**body, "stream": False})
            pending = httpx.Client(base_url=s.url, timeout=30)
            answers: list[httpx.Response] = []
            t = threading.Thread(target=lambda: answers.append(pending.send(second)))
            t.start()  # waits for the slot: the queue is now full
            assert wait_for(lambda: s.svc.scheduler.outstanding == 2)
            third = c.post("/v1/chat/completions", json=body)
            assert third.status_code == 429 and third.headers["retry-after"] == "3"
            assert third.json()["error"]["code"] == "queue_full"
            assert metric(s.url, "chatlm_num_requests_waiting") == 1
        t.join(30)
        pending.close()
        assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 30
    statuses = [r["status"] for r in s.records()]
    assert sorted(statuses) == [200, 200, 429]


def test_client_disconnect_cancels_its_sequence(start_server):
    SlowEngine.delay = 0.02
    s = start_server(SlowEngine, max_batch=2)
    body = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 100, "ignore_eos": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: {")
            if got == 4:
                break
        assert s.svc.scheduler.running == 1
    # the response is closed: the engine frees the slot within a step or two
    assert wait_for(lambda: s.svc.scheduler.running == 0 and s.svc.scheduler.outstanding == 0, timeout=5)
    assert s.svc.scheduler.engine.running == 0 and len(s.svc.scheduler.engine.cache.active.nonzero()) == 0
    assert metric(s.url, 'chatlm_request_finished_total{reason="cancelled"}') == 1
    (record,) = s.records()
    assert record["finish_reasons"] == ["cancelled"] and 3 <= record["completion_tokens"] < 50

    # the same for a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/chat/completions", json=body, timeout=0.3)
    assert wait_for(lambda: metric(s.url, 'chatlm_request_finished_total{reason="cancelled"}') == 2, timeout=5)
    assert s.svc.scheduler.running == 0
    # and the slots serve the next request in full
    r = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


class FailingEngine(Engine):
    """Fails the step in which `fail_next` is set (as a broken kernel or an OOM would)."""

    fail_next = False

    def step(self):
        if FailingEngine.fail_next and self.running:
            FailingEngine.fail_next = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return super().step()


def test_an_engine_failure_fails_the_request_not_the_server(start_server, loaded):
    s = start_server(FailingEngine, max_batch=4)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30, "temperature": 0}
    FailingEngine.fail_next = True
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert error["message"].endswith("illegal memory access was encountered (injected)")
    assert s.svc.scheduler.engine_restarts == 1 and s.svc.scheduler.alive
    # the next request is served by the fresh engine, with the right answer
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
    tok = loaded.tokenizer
    want, n, _ = engine_answer(loaded, chat_prompt_ids(tok, "hello"), 30, chat_stops(tok))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    # mid-stream: the error arrives as an SSE error event, then [DONE]
    with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3:
                FailingEngine.fail_next = True
    assert lines[-1] == "data: [DONE]" and "injected" in json.loads(lines[-2][6:])["error"]["message"]
    assert httpx.get(s.url + "/health").json()["status"] == "ok"
    assert [r["status"] for r in s.records()] == [500, 200, 500]
    assert metric(s.url, 'chatlm_request_finished_total{reason="error"}') == 2
