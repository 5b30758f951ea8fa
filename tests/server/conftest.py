"""Servers for the serving tests, all on the session's tiny smoke checkpoint (`smoke_train_run`):

- `served`: `python -m chatlm.serve` as a real subprocess on a free port (one per session);
- `start_server(...)`: the same app in this process (uvicorn on a thread), with the engine class
  swapped for a slower one (so a browser can press stop mid-stream), a failing one or one whose
  text is replaced (HTML injection); stopped at the end of the test module.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="serving needs the serve extra: pip install -e '.[serve]'")

from chatlm.engine import Engine, SamplingParams  # noqa: E402

URL_LINE = re.compile(r"chatlm serve: (http://\S+)")


@dataclasses.dataclass
class Served:
    url: str
    proc: subprocess.Popen
    root: Path
    run: Path  # the training run served
    lines: list[str]

    @property
    def run_dir(self) -> Path:
        """The server's own run directory."""
        (d,) = [p.parent for p in (self.root / "outputs" / "serve").glob("*/*/run.json")]
        return d


def launch(run: Path, env: dict, cwd: Path, *overrides: str, timeout: float = 90) -> Served:
    """Start `python -m chatlm.serve` and wait for the URL line it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatlm.serve", f"ckpt={run}", "port=0", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = URL_LINE.search(line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + timeout
    while not found and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not found:
        proc.kill()
        raise AssertionError("the server did not start:\n" + "".join(lines))
    return Served(found[0], proc, cwd, run, lines)


def stop(served: Served, sig: int = signal.SIGINT, timeout: float = 30) -> int:
    if served.proc.poll() is None:
        served.proc.send_signal(sig)
    return served.proc.wait(timeout)


@pytest.fixture(scope="session")
def served(smoke_train_run):
    run, env, root = smoke_train_run
    cwd = root / "serve_session"
    cwd.mkdir(exist_ok=True)
    env = dict(env, CHATLM_OUTPUT_ROOT=str(cwd / "outputs"))
    s = launch(run, env, cwd, "max_batch=32")
    yield s
    stop(s)


@pytest.fixture(scope="session")
def loaded(smoke_train_run):
    """The served checkpoint in this process, prepared for inference as the server prepares it."""
    from chatlm.engine.engine import cast_for_inference
    from chatlm.runtime.model_loading import load_model

    run, _, _ = smoke_train_run
    loaded = load_model(run, "cpu")
    cast_for_inference(loaded.model)
    return loaded


def engine_answer(loaded, prompt: list[int], max_tokens: int, stops: tuple[int, ...]) -> tuple[str, int, str]:
    """(text, tokens, finish reason) of the engine itself, greedy, for one prompt."""
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1)
    (c,) = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, stop_token_ids=stops))
    return c.text, len(c.tokens), c.finish_reason


def chat_prompt_ids(tok, text: str) -> list[int]:
    sp = tok.encode_special
    return [tok.bos_id, sp("<|user_start|>"), *tok.encode(text), sp("<|user_end|>"), sp("<|assistant_start|>")]


def chat_stops(tok) -> tuple[int, ...]:
    return (tok.encode_special("<|assistant_end|>"), tok.bos_id)


# ----------------------------------------------------------------------------------------------
# in-process servers


class SlowEngine(Engine):
    """The real engine, `delay` seconds slower per step (streams a browser can watch and stop)."""

    delay = 0.05

    def step(self):
        if self.has_work():
            time.sleep(self.delay)
        return super().step()


@dataclasses.dataclass
class InProcess:
    url: str
    svc: Any
    server: Any
    thread: threading.Thread
    log_path: Optional[Path]

    def records(self) -> list[dict]:
        import json

        if self.log_path is None or not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def start_server(loaded, tmp_path_factory):
    """start_server(engine_class=Engine, **serve config) -> InProcess, stopped at the module's end."""
    import uvicorn

    from chatlm.config import ServeConfig
    from chatlm.server.app import build_app
    from chatlm.server.serving import RequestLog, build_service, listen, url_of

    started: list[InProcess] = []

    def start(engine_class: Callable = Engine, **overrides: Any) -> InProcess:
        cfg = ServeConfig(ckpt="in-process", port=0, **overrides)
        log_path = tmp_path_factory.mktemp("serve") / "requests.jsonl"
        request_log = RequestLog(log_path) if cfg.request_log else None
        svc = build_service(cfg, loaded.model, loaded.tokenizer, "in-process", "tiny", request_log, engine_class)
        sock = listen("127.0.0.1", 0)
        config = uvicorn.Config(build_app(svc), log_config=None, log_level="warning", timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        assert server.started, "in-process server did not start"
        s = InProcess(url_of(sock, "127.0.0.1"), svc, server, thread, log_path if request_log else None)
        started.append(s)
        return s

    yield start
    for s in started:
        s.server.should_exit = True
        s.thread.join(15)


def metric(url: str, name: str) -> float:
    """One value of GET /metrics (0 when absent)."""
    import httpx

    from chatlm.server.metrics import parse_metrics

    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text).get(name, 0.0)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM}: apt-get install chromium (.ci/run does)"
)
