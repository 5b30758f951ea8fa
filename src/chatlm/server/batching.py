"""Continuous batching: one `Engine` on one thread, many HTTP requests on the event loop.

One thread owns the engine: nothing else touches it (the main thread in `python -m chatlm.serve`,
`run()`; a thread of its own with `start()`). Between two decode steps it takes the
requests submitted since the last step (`engine.add`: they join at the next step's admission) and
the cancellations (`engine.cancel`: the slot is free for the next step), then runs `engine.step()`
and hands that step's events to the event loop in one `call_soon_threadsafe`, where each request's
`Ticket` gets its own events as one list. When no request is left the thread sleeps on a condition
until the next submission.

Admission control happens on the event loop, before anything reaches the engine: at most
`max_batch` sequences run and `max_queue` more wait; a submission beyond that raises `QueueFull`
(the HTTP layer answers 429 with Retry-After).

Failures: a failure of one sequence's own work ends that sequence with finish_reason "error"
(the engine isolates it). A failure of a whole step (the model forward itself) fails the sequences
that were in the engine, and the thread carries on with a fresh engine from `make_engine`, so the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from chatlm.engine.engine import Engine, Event, RequestError, SamplingParams
from chatlm.server.metrics import ServerMetrics

log = logging.getLogger("chatlm")


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full."""


@dataclass(eq=False)
class Ticket:
    """One sequence of one request, seen from the event loop."""

    key: int
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(repr=False)
    submitted: float = 0.0  # time.perf_counter() at submission
    first: Optional[float] = None  # when its first token was produced
    last: Optional[float] = None  # when its latest token was produced
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    finish_reason: Optional[str] = None  # stop | length | cancelled | error
    error: Optional[str] = None
    rejected: bool = False  # the engine refused the request itself (a 400, not a 500)
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def next_events(self) -> list[Event]:
        """The events produced for this sequence since the last call (waits for at least one)."""
        batch = await self.queue.get()
        while not self.queue.empty():
            batch = batch + self.queue.get_nowait()
        return batch


class Scheduler:
    def __init__(
        self,
        make_engine: Callable[[], Engine],
        *,
        max_queue: int,
        metrics: Optional[ServerMetrics] = None,
        idle_wait_s: float = 0.1,
    ):
        self._make_engine = make_engine
        self.engine = make_engine()
        self.max_batch = self.engine.cache.slots
        self.max_len = self.engine.max_len
        self.max_queue = max_queue
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self.own_thread = True  # start() at the app's startup; False: someone calls run()
        self._until: Optional[Callable[[], bool]] = None
        self._tickets: dict[int, Ticket] = {}  # event loop only: sequences not yet finished
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._inbox: list[Ticket] = []
        self._cancels: list[int] = []
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.running = 0  # sequences in cache slots (engine thread writes, anyone reads)
        self.peak_running = 0
        self.steps = 0
        self.engine_restarts = 0
        self.failure: Optional[str] = None  # set when the engine thread died

    # -------------------------------------------------------------------------------------------
    # event loop side

    @property
    def outstanding(self) -> int:
        """Sequences submitted and not yet finished."""
        return len(self._tickets)

    @property
    def waiting(self) -> int:
        return max(0, len(self._tickets) - self.running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that receives the events (the app's, set at its startup)."""
        self._loop = loop

    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Drive the engine on a thread of its own (`own_thread`; tests, embedding)."""
        self.attach(loop or asyncio.get_running_loop())
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="chatlm-engine", daemon=True)
        self._thread.start()

    def run(self, until: Callable[[], bool]) -> None:
        """Drive the engine on the calling thread until `until()` holds when there is no work left.
        The serving stage runs it on the main thread, where torch's CPU kernels run fastest (an
        OpenMP team started from another thread measured up to 1.5x slower); the event loop runs
        on another thread and `attach`es itself."""
        self.own_thread = False
        self._until = until
        self._thread = threading.current_thread()
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Ticket]:
        """Queue sequences (one request's `n` choices together, all or none); raises QueueFull."""
        if self.failure is not None:
            raise RuntimeError(f"the engine thread stopped: {self.failure}")
        if len(self._tickets) + len(prompts) > self.max_batch + self.max_queue:
            raise QueueFull(
                f"{len(self._tickets)} sequences running or waiting; the server takes at most "
                f"{self.max_batch} running + {self.max_queue} waiting"
            )
        now = time.perf_counter()
        tickets = [
            Ticket(next(self._keys), list(p), sp, asyncio.Queue(), submitted=now) for p, sp in zip(prompts, params)
        ]
        for t in tickets:
            self._tickets[t.key] = t
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(amount=sum(len(t.prompt) for t in tickets))
        with self._cond:
            self._inbox.extend(tickets)
            self._cond.notify()
        return tickets

    def cancel(self, tickets: Sequence[Ticket]) -> None:
        """Stop sequences whose client went away; their slots are free at the next step."""
        keys = []
        for t in tickets:
            if not t.done and not t.cancelled:
                t.cancelled = True
                keys.append(t.key)
        if keys:
            with self._cond:
                self._cancels.extend(keys)
                self._cond.notify()

    def _deliver(self, events: list[Event], rejected: dict[int, str], at: float) -> None:
        """On the event loop: hand one step's events to their tickets and keep the metrics."""
        by_ticket: dict[int, list[Event]] = {}
        for ev in events:
            by_ticket.setdefault(int(ev.request_id), []).append(ev)
        m = self.metrics
        for key, evs in by_ticket.items():
            t = self._tickets.get(key)
            if t is None:
                continue
            for ev in evs:
                if ev.token is not None:
                    t.tokens += 1
                    if t.first is None:
                        t.first = at
                        if m is not None:
                            m.ttft.observe(at - t.submitted)
                    elif m is not None and t.last is not None:
                        m.tpot.observe(at - t.last)
                    t.last = at
                if ev.text:
                    t.text.append(ev.text)
                if ev.finish_reason is not None:
                    t.finish_reason, t.error = ev.finish_reason, ev.error
                    t.rejected = key in rejected
                    if t.rejected:
                        t.error = rejected[key]
            if m is not None:
                m.generation_tokens.inc(amount=sum(ev.token is not None for ev in evs))
            if t.done:
                del self._tickets[key]
                if m is not None:
                    m.finished.inc(t.finish_reason or "")
                    if t.tokens:
                        m.e2e.observe(at - t.submitted)
            t.queue.put_nowait(evs)

    # -------------------------------------------------------------------------------------------
    # engine thread

    def _run(self) -> None:
        in_engine: set[int] = set()
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._inbox or self._cancels or self.engine.has_work()):
                        if self._until is not None and self._until():
                            self._stop = True
                            break
                        self._cond.wait(self.idle_wait_s)
                    if self._stop:
                        break
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                events, rejected = self._take(inbox, cancels, in_engine)
                if self.engine.has_work():
                    events += self._step(in_engine)
                self.running = self.engine.running
                self.peak_running = max(self.peak_running, self.running)
                if events:
                    self._post(events, rejected)
        except BaseException as e:  # the thread itself failed: fail everything still open
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("the engine thread stopped")
            self._post([Event(k, None, "", "error", error=self.failure) for k in in_engine], {})
            raise
        finally:
            self._fail_unadmitted()

    def _take(self, inbox: list[Ticket], cancels: list[int], in_engine: set[int]) -> tuple[list[Event], dict]:
        events: list[Event] = []
        rejected: dict[int, str] = {}
        for key in cancels:
            if key in in_engine:
                self.engine.cancel(key)  # its "cancelled" event comes out of the next step
        cancelled = set(cancels)
        for t in inbox:
            if t.cancelled or t.key in cancelled:
                events.append(Event(t.key, None, "", "cancelled"))
                continue
            try:
                self.engine.add(t.prompt, t.params, request_id=t.key)
                in_engine.add(t.key)
            except RequestError as e:
                rejected[t.key] = str(e)
                events.append(Event(t.key, None, "", "error", error=str(e)))
        return events, rejected

    def _step(self, in_engine: set[int]) -> list[Event]:
        batch = self.engine.running
        try:
            events = self.engine.step()
        except Exception as e:
            message = f"the engine failed: {type(e).__name__}: {e}"
            log.exception("engine step failed; failing its %d sequences and starting a fresh engine", len(in_engine))
            events = [Event(k, None, "", "error", error=message) for k in sorted(in_engine)]
            in_engine.clear()
            self.engine = None  # type: ignore[assignment]  # free the old cache before the new one
            self.engine = self._make_engine()
            self.engine_restarts += 1
            return events
        self.steps += 1
        if self.metrics is not None:
            self.metrics.steps.inc()
            if batch:
                self.metrics.batch.observe(batch)
        for ev in events:
            if ev.finish_reason is not None:
                in_engine.discard(int(ev.request_id))
        return events

    def _post(self, events: list[Event], rejected: dict[int, str]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._deliver, events, rejected, time.perf_counter())
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def _fail_unadmitted(self) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
        if inbox:
            self._post([Event(t.key, None, "", "error", error="the server is shutting down") for t in inbox], {})


def engine_factory(model: Any, tokenizer: Any, engine_class: type = Engine, **kwargs: Any) -> Callable[[], Engine]:
    """A function that builds the server's engine (again, after a failed step)."""
    return lambda: engine_class(model, tokenizer, **kwargs)
