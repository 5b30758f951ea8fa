"""The HTTP routes: the OpenAI API subset, /health, /metrics and the web chat page.

    app = build_app(Service(scheduler, tokenizer, cfg, model_name="d4-step500", checkpoint=...))

`Service` holds what the routes need: the scheduler (which owns the engine), the tokenizer, the
limits and defaults (a `ServeConfig`), the metrics and the request log. Every route answers errors
with OpenAI's body `{"error": {"message", "type", "param", "code"}}`; nothing a client sends can
stop the server. docs/serving.md lists the parameters, the errors and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from chatlm.engine.engine import SamplingParams
from chatlm.server.batching import QueueFull, Scheduler, Ticket
from chatlm.server.metrics import ServerMetrics
from chatlm.server.prompts import chat_prompt, check_chars, completion_prompts
from chatlm.server.schemas import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("chatlm")

STATIC = Path(__file__).resolve().parent / "static"
MAX_STOP_STRINGS = 4  # as OpenAI
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


@dataclass
class Service:
    scheduler: Scheduler
    tokenizer: Any
    cfg: Any  # chatlm.config.ServeConfig (limits and request defaults)
    model_name: str
    checkpoint: str = ""
    chat_stops: tuple[int, ...] = ()
    text_stops: tuple[int, ...] = ()
    request_log: Optional[Callable[[dict], None]] = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Optional[ServerMetrics] = None
    draining: bool = False

    def __post_init__(self) -> None:
        s = self.scheduler
        if self.metrics is None:
            self.metrics = ServerMetrics(lambda: s.running, lambda: s.waiting, lambda: s.peak_running)
        s.metrics = self.metrics


# ----------------------------------------------------------------------------------------------
# request checks shared by both generation endpoints


def parse(schema: type[BaseModel], raw: bytes) -> Any:
    """A request body as `schema`, or a 400 naming the first bad parameter."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        kind = err["type"]
        param = _param(err.get("loc", ()))
        if kind == "json_invalid" or (kind == "model_type" and not err.get("loc")):
            raise APIError(
                400, "We could not parse the JSON body of your request: it must be a JSON object.", code="invalid_json"
            ) from None
        if kind == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if kind == "missing":
            raise APIError(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        raise APIError(400, f"Invalid '{param}': {err['msg']}.", param=param, code="invalid_value") from None


_TYPE_TAGS = ("str", "int", "float", "bool", "none", "list", "dict")


def _param(loc: Sequence[Any]) -> Optional[str]:
    """`messages[0].content` from pydantic's location (without its union-branch tags)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or part[:1].isupper() or "-" in part:
            break
        else:
            out += f".{part}" if out else part
    return out or None


def check_common(svc: Service, req: Any) -> None:
    cfg = svc.cfg
    if req.model is not None and req.model != svc.model_name:
        raise APIError(
            404,
            f"The model `{req.model}` does not exist. This server serves `{svc.model_name}`.",
            param="model",
            code="model_not_found",
        )
    bad = req.unsupported()
    if bad is not None:
        raise APIError(
            400,
            f"'{bad}' is not supported by this server (chatlm serves plain text generation)",
            param=bad,
            code="unsupported_parameter",
        )
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.n > svc.scheduler.max_batch:
        raise APIError(400, f"n must be <= {svc.scheduler.max_batch} (the server's max_batch)", param="n")
    stops = req.stop_list()
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    new = req.new_tokens()
    if new is not None and new > cfg.max_tokens_cap:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        raise APIError(
            400, f"{param} is too large: {new}. This server returns at most {cfg.max_tokens_cap} tokens.", param=param
        )
    if req.top_k is not None and req.top_k > svc.tokenizer.vocab_size:
        raise APIError(400, f"top_k must be <= the vocabulary size ({svc.tokenizer.vocab_size})", param="top_k")


def sampling(svc: Service, req: Any, stop_ids: tuple[int, ...]) -> list[SamplingParams]:
    """One SamplingParams per choice (seeds seed, seed+1, ... when a seed is given)."""
    cfg = svc.cfg
    new = req.new_tokens()
    base = SamplingParams(
        max_tokens=cfg.max_tokens if new is None else new,
        temperature=cfg.temperature if req.temperature is None else req.temperature,
        top_k=cfg.top_k if req.top_k is None else req.top_k,
        top_p=cfg.top_p if req.top_p is None else req.top_p,
        stop=tuple(req.stop_list()),
        stop_token_ids=() if req.ignore_eos else stop_ids,
    )
    seeds = [None if req.seed is None else (req.seed + i) % (1 << 62) for i in range(req.n)]
    return [replace(base, seed=s) for s in seeds]


def check_length(svc: Service, prompt: list[int], param: str) -> None:
    limit = svc.scheduler.max_len
    if len(prompt) >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
            f"{len(prompt)} tokens (at most {limit - 1} leave room for an answer).",
            param=param,
            code="context_length_exceeded",
        )


def submit(svc: Service, prompts: list[list[int]], params: list[SamplingParams]) -> list[Ticket]:
    if svc.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    try:
        return svc.scheduler.submit(prompts, params)
    except QueueFull as e:
        retry = str(svc.cfg.retry_after_s)
        raise APIError(
            429,
            f"The server is busy: {e}. Retry later.",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": retry},
        ) from None
    except RuntimeError as e:
        raise APIError(503, str(e), type="server_error", code="engine_stopped") from None


# ----------------------------------------------------------------------------------------------
# answering: whole responses and server-sent events


def _failure(tickets: Sequence[Ticket]) -> Optional[APIError]:
    for t in tickets:
        if t.finish_reason == "error":
            if t.rejected:
                return APIError(400, t.error or "bad request", param="prompt")
            return APIError(500, f"The request failed: {t.error}", type="server_error", code="engine_error")
    return None


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, svc: Service, tickets: Sequence[Ticket]) -> AsyncIterator[None]:
    """While the block runs, a client that hangs up cancels its sequences."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                svc.scheduler.cancel(tickets)
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def wait_all(tickets: Sequence[Ticket]) -> None:
    for t in tickets:
        while not t.done:
            await t.next_events()


def _log(svc: Service, record: dict) -> None:
    if svc.request_log is not None:
        try:
            svc.request_log(record)
        except OSError as e:  # a full disk must not fail the request
            log.warning("request log: %s", e)


async def _logged(svc: Service, kind: str, answer: Awaitable[Response]) -> Response:
    """Await a generation route; a refusal before its sequences were submitted is logged here."""
    try:
        return await answer
    except APIError as e:
        if not e.logged:
            _log(svc, {"endpoint": kind, "status": e.status, "error": e.message, "param": e.param})
        raise


def _record(kind: str, rid: str, req: Any, prompts: list[list[int]], tickets: Sequence[Ticket], t0: float) -> dict:
    ttfts = [t.first - t.submitted for t in tickets if t.first is not None]
    return {
        "id": rid,
        "endpoint": kind,
        "stream": req.stream,
        "n": req.n,
        "prompt_tokens": sum(map(len, prompts)),
        "completion_tokens": sum(t.tokens for t in tickets),
        "finish_reasons": [t.finish_reason or ("cancelled" if t.cancelled else None) for t in tickets],
        "ttft_s": round(min(ttfts), 6) if ttfts else None,
        "duration_s": round(time.perf_counter() - t0, 6),
        "params": {k: getattr(req, k) for k in ("max_tokens", "temperature", "top_k", "top_p", "seed")},
    }


class _Stream(StreamingResponse):
    """Server-sent events whose sequences are cancelled however the response ends."""

    def __init__(self, content: Any, on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class Generation:
    """One generation request from submission to its last byte: `kind` is "chat" or "text"."""

    def __init__(self, svc: Service, request: Request, kind: str, req: Any, prompts: list[list[int]], n: int):
        self.svc, self.request, self.kind, self.req, self.prompts, self.n = svc, request, kind, req, prompts, n
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.tickets: list[Ticket] = []
        self.status = 200
        self._prefix: Optional[str] = None
        self._suffix = ""

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def usage(self) -> Usage:
        prompt = sum(map(len, self.prompts))
        completion = sum(t.tokens for t in self.tickets)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def finish(self, error: Optional[APIError] = None) -> None:
        record = _record(self.kind, self.id, self.req, self.prompts, self.tickets, self.t0)
        record["status"] = error.status if error is not None else self.status
        if error is not None:
            record["error"] = error.message
            error.logged = True
        _log(self.svc, record)

    async def run(self, params: list[SamplingParams]) -> Response:
        expanded = [p for p in self.prompts for _ in range(self.n)]
        self.tickets = submit(self.svc, expanded, params * len(self.prompts))
        try:
            if self.req.stream:
                return await self._stream()
            return await self._whole()
        except BaseException:
            self.svc.scheduler.cancel(self.tickets)
            raise

    async def _whole(self) -> Response:
        async with cancel_on_disconnect(self.request, self.svc, self.tickets):
            await wait_all(self.tickets)
        error = _failure(self.tickets)
        if error is not None:
            self.finish(error)
            raise error
        self.finish()
        if self.kind == "chat":
            choices = [
                ChatChoice(
                    index=i, message=AssistantMessage(content="".join(t.text)), finish_reason=t.finish_reason or ""
                )
                for i, t in enumerate(self.tickets)
            ]
            body: Any = ChatCompletion(
                id=self.id, created=self.created, model=self.svc.model_name, choices=choices, usage=self.usage()
            )
        else:
            texts = [
                CompletionChoice(index=i, text="".join(t.text), finish_reason=t.finish_reason or "")
                for i, t in enumerate(self.tickets)
            ]
            body = Completion(
                id=self.id, created=self.created, model=self.svc.model_name, choices=texts, usage=self.usage()
            )
        return JSONResponse(body.model_dump())

    async def _stream(self) -> Response:
        # wait for every choice's first events, so a request that fails at once gets a real status
        first: list[list[Any]] = []
        async with cancel_on_disconnect(self.request, self.svc, self.tickets):
            for t in self.tickets:
                first.append(await t.next_events() if not t.done else [])
        error = _failure(self.tickets)
        if error is not None:
            self.finish(error)
            raise error
        return _Stream(self._events(first), self._closed)

    def _closed(self) -> None:
        unfinished = [t for t in self.tickets if not t.done]
        if unfinished:
            self.svc.scheduler.cancel(unfinished)
        if not getattr(self, "_logged", False):
            self._logged = True
            self.finish()

    def _chunk(self, index: int, text: Optional[str], finish: Optional[str], role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice: dict = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.svc.model_name}
        chunk["choices"] = [choice]
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            chunk["usage"] = None
        return chunk

    def _text_event(self, index: int, text: str) -> str:
        """`sse(self._chunk(index, text, None))`, built from a prefix made once (one per token)."""
        if self._prefix is None:
            head = {"id": self.id, "object": self.object, "created": self.created, "model": self.svc.model_name}
            self._prefix = "data: " + json.dumps(head, separators=(",", ":"), ensure_ascii=False)[:-1]
            usage = self.req.stream_options is not None and self.req.stream_options.include_usage
            self._suffix = ',"logprobs":null,"finish_reason":null}]' + (',"usage":null' if usage else "") + "}\n\n"
        body = json.dumps(text, ensure_ascii=False)
        field = f'"delta":{{"content":{body}}}' if self.kind == "chat" else f'"text":{body}'
        return f'{self._prefix},"choices":[{{"index":{index},{field}{self._suffix}'

    async def _events(self, first: list[list[Any]]) -> AsyncIterator[str]:
        out: list[str] = []
        if self.kind == "chat":
            out += [sse(self._chunk(i, None, None, role=True)) for i in range(len(self.tickets))]
        pending = {i: evs for i, evs in enumerate(first)}
        while True:
            for i, evs in pending.items():
                for ev in evs:
                    if ev.finish_reason == "error":
                        err = APIError(500, f"The request failed: {ev.error}", type="server_error", code="engine_error")
                        self.status = 500
                        yield "".join(out) + sse(err.body()) + "data: [DONE]\n\n"
                        return
                    if ev.text:
                        out.append(self._text_event(i, ev.text))
                    if ev.finish_reason is not None:
                        out.append(sse(self._chunk(i, None if self.kind == "chat" else "", ev.finish_reason)))
            if out:
                yield "".join(out)
                out = []
            live = [i for i, t in enumerate(self.tickets) if not t.done or not t.queue.empty()]
            if not live:
                break
            pending = {}
            if len(live) == 1:
                pending[live[0]] = await self.tickets[live[0]].next_events()
            else:
                pending = await _next_of_any([self.tickets[i] for i in live], live)
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.svc.model_name}
            chunk.update(choices=[], usage=self.usage().model_dump())
            out.append(sse(chunk))
        yield "".join(out) + "data: [DONE]\n\n"


async def _next_of_any(tickets: list[Ticket], indices: list[int]) -> dict[int, list]:
    """The events of whichever of several sequences has some first (and of any others ready too)."""
    tasks = {asyncio.ensure_future(t.queue.get()): i for t, i in zip(tickets, indices)}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    out: dict[int, list] = {}
    for task in done:
        i = tasks[task]
        t = tickets[indices.index(i)]
        batch = task.result()
        while not t.queue.empty():
            batch = batch + t.queue.get_nowait()
        out[i] = batch
    return out


# ----------------------------------------------------------------------------------------------
# the app


class _CountRequests:
    """ASGI middleware: chatlm_requests_total{endpoint, status} for every HTTP answer."""

    def __init__(self, app: Any, svc: Service):
        self.app, self.svc = app, svc

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            assert self.svc.metrics is not None
            self.svc.metrics.requests.inc(endpoint, str(status))


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def build_app(svc: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = svc.scheduler
        if s.own_thread:
            s.start(asyncio.get_running_loop())
        else:  # driven by the stage's main thread (Scheduler.run)
            s.attach(asyncio.get_running_loop())
        try:
            yield
        finally:
            svc.draining = True
            if s.own_thread:
                s.stop()

    app = FastAPI(title="chatlm", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_middleware(_CountRequests, svc=svc)  # type: ignore[arg-type]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, type=kind, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        s = svc.scheduler
        ok = s.alive and not svc.draining
        body = {
            "status": "ok" if ok else ("draining" if svc.draining else "engine stopped"),
            "model": svc.model_name,
            "running": s.running,
            "waiting": s.waiting,
            "max_batch": s.max_batch,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        assert svc.metrics is not None
        return Response(svc.metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)

    def card() -> ModelCard:
        return ModelCard(
            id=svc.model_name, created=svc.created, max_model_len=svc.scheduler.max_len, root=svc.checkpoint
        )

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != svc.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(card().model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _logged(svc, "chat", _chat(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _logged(svc, "text", _text(request))

    async def _chat(request: Request) -> Response:
        req = parse(ChatCompletionRequest, await request.body())
        check_common(svc, req)
        cfg = svc.cfg
        if len(req.messages) > cfg.max_messages:
            raise APIError(400, f"at most {cfg.max_messages} messages per request", param="messages")
        check_chars([m.text() for m in req.messages], cfg.max_message_chars, cfg.max_prompt_chars, "messages")
        prompt = chat_prompt(svc.tokenizer, req.messages)
        check_length(svc, prompt, "messages")
        gen = Generation(svc, request, "chat", req, [prompt], req.n)
        return await gen.run(sampling(svc, req, svc.chat_stops))

    async def _text(request: Request) -> Response:
        req = parse(CompletionRequest, await request.body())
        check_common(svc, req)
        cfg = svc.cfg
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        check_chars(texts, cfg.max_message_chars, cfg.max_prompt_chars, "prompt")
        prompts = completion_prompts(svc.tokenizer, req.prompt, svc.tokenizer.vocab_size)
        if len(prompts) * req.n > svc.scheduler.max_batch:
            raise APIError(400, f"prompts x n must be <= {svc.scheduler.max_batch} (the server's max_batch)", param="n")
        for p in prompts:
            check_length(svc, p, "prompt")
        gen = Generation(svc, request, "text", req, prompts, req.n)
        return await gen.run(sampling(svc, req, svc.text_stops))

    return app
