"""The server's small parts on their own: the Prometheus text format, the per-token SSE fast path
(byte-equal to the general chunk builder), request parsing into OpenAI error parameters."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from chatlm.server.app import Generation, parse, sse
from chatlm.server.metrics import Counter, Histogram, ServerMetrics, parse_metrics
from chatlm.server.schemas import APIError, ChatCompletionRequest, CompletionRequest, StreamOptions


def test_metrics_text_format():
    m = ServerMetrics(lambda: 3, lambda: 1, lambda: 7)
    m.requests.inc("/v1/completions", "200")
    m.requests.inc("/v1/completions", "200")
    m.requests.inc("/health", "503")
    for v in (0.003, 0.02, 0.02, 50.0):
        m.ttft.observe(v)
    text = m.render()
    assert "# TYPE chatlm_time_to_first_token_seconds histogram" in text and text.endswith("\n")
    values = parse_metrics(text)
    assert values['chatlm_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert values['chatlm_requests_total{endpoint="/health",status="503"}'] == 1
    assert (values["chatlm_num_requests_running"], values["chatlm_num_requests_waiting"]) == (3, 1)
    assert values["chatlm_max_requests_running"] == 7
    # cumulative buckets: le=0.005 holds 1, le=0.02 holds 3 (the bound is inclusive), +Inf all 4
    b = "chatlm_time_to_first_token_seconds_bucket"
    assert (values[f'{b}{{le="0.005"}}'], values[f'{b}{{le="0.02"}}'], values[f'{b}{{le="+Inf"}}']) == (1, 3, 4)
    assert math.isclose(values["chatlm_time_to_first_token_seconds_sum"], 50.043)
    c = Counter("x_total", "labels are escaped", ("k",))
    c.inc('a"b\\c')
    assert c.render()[-1] == 'x_total{k="a\\"b\\\\c"} 1'
    h = Histogram("h", "h", (1, 2))
    h.observe(5)
    assert h.render()[2:5] == ['h_bucket{le="1"} 0', 'h_bucket{le="2"} 0', 'h_bucket{le="+Inf"} 1']


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("usage", [False, True])
def test_token_chunks_equal_the_general_builder(kind, usage):
    g = Generation.__new__(Generation)
    g.kind, g.id, g.created, g._prefix, g._suffix = kind, "cmpl-1", 17, None, ""
    g.svc = SimpleNamespace(model_name='a "model"')
    g.req = SimpleNamespace(stream_options=StreamOptions(include_usage=True) if usage else None)
    for text in ["hello", ' "quoted"\n', "日本語 é", "</script>"]:
        fast = g._text_event(2, text)
        assert fast == sse(g._chunk(2, text, None))
        chunk = json.loads(fast.removeprefix("data: "))
        assert chunk["choices"][0]["index"] == 2 and ("usage" in chunk) == usage


@pytest.mark.parametrize(
    "schema,body,param,code",
    [
        (ChatCompletionRequest, b'{"messages": [], "n": 0}', "n", "invalid_value"),
        (ChatCompletionRequest, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
         "messages[0].content", "invalid_value"),
        (ChatCompletionRequest, b'{"messages": [{"role": "user"}], "top_k": -1}', "top_k", "invalid_value"),
        (CompletionRequest, b'{"prompt": 5}', "prompt", "invalid_value"),
        (CompletionRequest, b'{"prompt": "x", "temperature": null, "seed": "1"}', "seed", "invalid_value"),
        (CompletionRequest, b'{"prompt": "x", "frobnicate": true}', "frobnicate", None),
        (CompletionRequest, b"", None, "invalid_json"),
    ],
)  # fmt: skip
def test_parse_names_the_parameter(schema, body, param, code):
    with pytest.raises(APIError) as err:
        parse(schema, body)
    assert err.value.status == 400 and (err.value.param, err.value.code) == (param, code)


def test_neutral_values_of_unsupported_parameters_pass():
    ok = parse(ChatCompletionRequest, b'{"messages": [], "logprobs": false, "tools": [], "presence_penalty": 0}')
    assert ok.unsupported() is None
    bad = parse(CompletionRequest, b'{"prompt": "x", "echo": true}')
    assert bad.unsupported() == "echo"
