"""The web chat page in headless Chromium (Debian's package, driven by Playwright): a message gets a
streamed answer, stop ends it (and the server frees the slot), regenerate replaces it, the
conversation exports as JSON, new chat clears it; model output holding HTML is shown as text.

With CHATLM_UPDATE_SCREENSHOT=1 the page's screenshot is saved to docs/images/serve_ui.png."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from chatlm.engine import Engine
from tests.server.conftest import (
    CHROMIUM,
    SlowEngine,
    chat_prompt_ids,
    chat_stops,
    engine_answer,
    metric,
    needs_chromium,
    wait_for,
)

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")

pytestmark = needs_chromium

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "serve_ui.png"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 720})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


REPLY = "(document.querySelector('.message.assistant .content') || {textContent: ''}).textContent"


def assistant_texts(page) -> list[str]:
    return page.locator(".message.assistant .content").all_inner_texts()


def test_chat_streams_stops_regenerates_exports_and_clears(start_server, page, tmp_path, loaded):
    tok = loaded.tokenizer
    _, _, reason = engine_answer(loaded, chat_prompt_ids(tok, "Hello there"), 100, chat_stops(tok))
    assert reason == "length"  # greedy, the reply would run 100 tokens: it is still streaming at stop
    want, n, finish = engine_answer(loaded, chat_prompt_ids(tok, "Hello there"), 24, chat_stops(tok))
    SlowEngine.delay = 0.04
    s = start_server(SlowEngine, max_batch=4)
    page.goto(s.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "100")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    assert page.locator(".message.user .content").inner_text() == "Hello there"
    # tokens stream in: the reply is seen non-empty and then longer, while the state says streaming
    page.wait_for_function(f"{REPLY}.length > 0")
    first = assistant_texts(page)[0]
    page.wait_for_function(f"{REPLY}.length > {len(first)}")
    assert page.inner_text("#state") == "streaming" and page.is_visible("#stop")
    page.wait_for_function("document.getElementById('speed').textContent.endsWith('tok/s')")
    page.click("#stop")
    page.wait_for_function("document.getElementById('state').textContent === 'stopped'")
    assert not page.is_visible("#stop")
    stopped = assistant_texts(page)[0]
    page.wait_for_timeout(200)
    assert assistant_texts(page)[0] == stopped  # nothing arrives after stop
    # the server saw the disconnect and freed the slot
    assert wait_for(lambda: metric(s.url, 'chatlm_request_finished_total{reason="cancelled"}') == 1, timeout=5)
    assert s.svc.scheduler.running == 0

    # regenerate: the stopped reply is replaced by a complete one
    page.fill("#max-tokens", "24")
    page.click("#regenerate")
    page.wait_for_function("document.getElementById('state').textContent === 'done'")
    assert len(assistant_texts(page)) == 1
    assert page.locator(".message.assistant .meta").inner_text().startswith(f"{n} tokens")
    assert page.evaluate(REPLY) == want  # the page shows exactly the engine's greedy text
    if os.environ.get("CHATLM_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    page.screenshot(path=str(tmp_path / "serve_ui.png"))

    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][0]["content"] == "Hello there" and exported["model"] == "tiny"
    assert exported["messages"][1]["content"] == want
    assert exported["settings"] == {"temperature": 0, "top_k": 50, "max_tokens": 24}

    page.click("#new-chat")
    assert page.locator(".message").count() == 0 and page.inner_text("#state") == "ready"
    records = s.records()
    assert [r["finish_reasons"][0] for r in records] == ["cancelled", finish]
    assert records[1]["params"] == {"max_tokens": 24, "temperature": 0.0, "top_k": 50, "top_p": None, "seed": None}


PAYLOAD = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> **bold** and `code`'


class InjectingEngine(Engine):
    """The real engine, except that each request's text is PAYLOAD, three characters per token."""

    def step(self):
        out = []
        for ev in super().step():
            sent = self.sent.get(ev.request_id, 0) if hasattr(self, "sent") else 0
            self.sent = getattr(self, "sent", {})
            piece = PAYLOAD[sent : sent + 3] if ev.token is not None else ""
            if ev.finish_reason is not None:
                piece = PAYLOAD[sent:]
            self.sent[ev.request_id] = sent + len(piece)
            out.append(dataclasses.replace(ev, text=piece))
        return out


def test_model_output_is_shown_as_text_never_run(start_server, page):
    s = start_server(InjectingEngine, max_batch=2)
    page.goto(s.url + "/")
    page.fill("#max-tokens", "60")
    page.fill("#input", "<b>user html</b>")
    page.click("#send")
    page.wait_for_function("document.getElementById('state').textContent === 'done'")
    assert page.locator(".message.user .content").inner_text() == "<b>user html</b>"
    shown = page.locator(".message.assistant .content").inner_text()
    assert "<script>window.__pwned = 1</script>" in shown and '<img src=x onerror="window.__pwned = 2">' in shown
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#messages script, #messages img, #messages b").count() == 0
    # the Markdown subset is rendered, as elements holding text
    assert page.locator(".message.assistant strong").inner_text() == "bold"
    assert page.locator(".message.assistant code").inner_text() == "code"
