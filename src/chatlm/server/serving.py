"""The serving stage's body: load the checkpoint, build the engine and the scheduler, and run the
HTTP server until Ctrl-C or SIGTERM (requests in flight finish first; the run is then recorded as
completed with the server's totals as final metrics).

`run.json` gets `served` (the checkpoint, its step and run, the tokenizer, the model name, the
URL); `requests.jsonl` gets one line per generation request (no prompt or answer text).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from chatlm.errors import ChatlmError, ConfigError
from chatlm.runtime.rundir import now_iso, read_json

log = logging.getLogger("chatlm")


class RequestLog:
    """requests.jsonl: one JSON object per request, appended as each one ends."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def __call__(self, record: dict) -> None:
        line = json.dumps({"time": now_iso(), **record}, default=str)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


def default_model_name(checkpoint: Path, meta: dict) -> str:
    """`<run name>-step<N>`: the served run's name (its run.json) and the checkpoint's step."""
    run_dir = checkpoint.parent.parent
    record = read_json(run_dir / "run.json") or {}
    name = str(record.get("run_name") or meta.get("stage") or run_dir.name or "chatlm")
    return f"{name}-step{int(meta.get('step', 0))}"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or one line naming the key."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError("host", f"cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # clients may connect from now on (uvicorn accepts once it runs)
    except OSError as e:
        sock.close()
        raise ConfigError(
            "port", f"cannot listen on {host}:{port}: {e.strerror}; choose another with port=N (0 = any free port)"
        ) from None
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


@contextlib.contextmanager
def stop_on_signals(server: Any) -> Iterator[None]:
    """Ctrl-C / SIGTERM ask uvicorn to stop (requests in flight finish); a second Ctrl-C forces it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def build_service(
    cfg: Any,
    model: Any,
    tok: Any,
    checkpoint: str,
    model_name: str,
    request_log: Any = None,
    engine_class: Optional[type] = None,
) -> Any:
    """The engine (in the scheduler) and everything the routes need, for a loaded model.
    `engine_class`: an `Engine` subclass to use instead (tests: slower or failing engines)."""
    from chatlm.engine.engine import Engine
    from chatlm.engine.tools import ToolTokens
    from chatlm.server.app import Service
    from chatlm.server.batching import Scheduler, engine_factory

    try:
        chat_stops: tuple[int, ...] = (tok.encode_special("<|assistant_end|>"), tok.bos_id)
        tools = ToolTokens(tok) if cfg.tools else None
    except KeyError:  # a tokenizer without the chat special tokens: completions only
        chat_stops, tools = (), None
    make = engine_factory(
        model, tok, engine_class or Engine, max_batch=cfg.max_batch, tools=tools, cuda_graphs=cfg.cuda_graphs
    )
    scheduler = Scheduler(make, max_queue=cfg.max_queue)
    return Service(
        scheduler,
        tok,
        cfg,
        model_name,
        checkpoint=checkpoint,
        chat_stops=chat_stops,
        text_stops=(tok.bos_id,),
        request_log=request_log,
    )


def warm_up(engine: Any, tok: Any) -> None:
    """One short generation before the first client (first calls of every kernel; CUDA graphs)."""
    from chatlm.engine.engine import SamplingParams

    engine.generate([[tok.bos_id]], SamplingParams(max_tokens=2))
    engine.generate([[tok.bos_id]], SamplingParams(max_tokens=2, temperature=1.0, top_k=5, seed=0))


def serve(cfg: Any, run: Any) -> dict:
    """The stage body (`python -m chatlm.serve`)."""
    import uvicorn

    from chatlm.engine.engine import cast_for_inference
    from chatlm.model import select_inference_backend
    from chatlm.runtime.model_loading import load_model, run_dir_of
    from chatlm.server.app import build_app

    sock = listen(cfg.host, cfg.port)  # before the model loads: a busy port fails at once
    device, dtype = run.ctx.device, run.policy.compute_dtype
    loaded = load_model(
        cfg.ckpt, device, dtype, tokenizer_dir=cfg.tokenizer_dir, backend=select_inference_backend(device, dtype)
    )
    model, tok, meta = cast_for_inference(loaded.model), loaded.tokenizer, loaded.meta
    checkpoint = Path(meta["checkpoint"])
    name = cfg.model_name or default_model_name(checkpoint, meta)
    request_log: Optional[RequestLog] = RequestLog(run.path / "requests.jsonl") if cfg.request_log else None
    svc = build_service(cfg, model, tok, str(checkpoint), name, request_log)
    warm_up(svc.scheduler.engine, tok)
    url = url_of(sock, cfg.host)
    served = {
        "checkpoint": str(checkpoint),
        "step": int(meta.get("step", 0)),
        "run_dir": str(run_dir_of(checkpoint)),
        "stage": meta.get("stage"),
        "tokenizer": tok.identity(),
        "model_name": name,
        "url": url,
        "context": svc.scheduler.max_len,
        "max_batch": svc.scheduler.max_batch,
    }
    run.update_record(served=served)
    run.record_derived(served_checkpoint=str(checkpoint), model_name=name, url=url)
    config = uvicorn.Config(
        build_app(svc),
        log_config=None,
        log_level="info" if cfg.access_log else "warning",
        access_log=cfg.access_log,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    # HTTP on a thread, the engine on this (main) thread: see Scheduler.run
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="chatlm-http", daemon=True)
    log.info("serving %s (step %s) as %r on %s, %s", checkpoint, served["step"], name, device, str(dtype))
    print(f"chatlm serve: {url}  (web chat: {url}/ | OpenAI API: {url}/v1 | model: {name})", flush=True)
    try:
        with stop_on_signals(server):
            http.start()
            try:
                svc.scheduler.run(until=lambda: not http.is_alive())
            finally:
                server.should_exit = True
                http.join(30)
    finally:
        if request_log is not None:
            request_log.close()
        sock.close()
    if not server.started:
        raise ChatlmError("the HTTP server did not start (its error is in the log above)")
    m = svc.metrics
    assert m is not None
    return {
        "requests": int(sum(m.requests._values.values())),
        "prompt_tokens": int(m.prompt_tokens.value()),
        "generation_tokens": int(m.generation_tokens.value()),
        "max_running": svc.scheduler.peak_running,
        "engine_restarts": svc.scheduler.engine_restarts,
    }
