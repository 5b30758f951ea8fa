"""The server's Prometheus metrics, in the text exposition format (version 0.0.4) at `/metrics`.

Counters and histograms are updated on the event loop's thread (requests and the tokens they
receive); the gauges read the scheduler's live numbers when scraped. Names follow vLLM's where they
mean the same thing, with the `chatlm_` prefix:

| name                                         | kind      | what                                             |
|----------------------------------------------|-----------|--------------------------------------------------|
| chatlm_requests_total{endpoint,status}       | counter   | HTTP requests answered, by endpoint and status   |
| chatlm_request_finished_total{reason}        | counter   | sequences ended: stop, length, cancelled, error  |
| chatlm_prompt_tokens_total                   | counter   | prompt tokens admitted                           |
| chatlm_generation_tokens_total               | counter   | tokens generated                                 |
| chatlm_decode_steps_total                    | counter   | engine steps taken                               |
| chatlm_num_requests_running                  | gauge     | sequences holding a cache slot now               |
| chatlm_num_requests_waiting                  | gauge     | sequences queued for a slot now                  |
| chatlm_max_requests_running                  | gauge     | the most sequences that ever decoded together    |
| chatlm_batch_size                            | histogram | running sequences per engine step                |
| chatlm_time_to_first_token_seconds           | histogram | submission to the first token                    |
| chatlm_time_per_output_token_seconds         | histogram | the gap between consecutive tokens of a sequence |
| chatlm_e2e_request_latency_seconds           | histogram | submission to the last token                     |
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Iterable, Optional

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for labels, value in sorted(self._values.items()):
            out.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return out


class Gauge:
    """A value read when scraped (`read`), or set directly."""

    def __init__(self, name: str, help: str, read: Optional[Callable[[], float]] = None):
        self.name, self.help, self._read = name, help, read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = value

    def value(self) -> float:
        return float(self._read()) if self._read is not None else self._value

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.value())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    """Every metric of the server; `render()` is the body of GET /metrics."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float], peak: Callable[[], float]):
        self.requests = Counter("chatlm_requests_total", "HTTP requests answered", ("endpoint", "status"))
        self.finished = Counter("chatlm_request_finished_total", "sequences ended, by finish reason", ("reason",))
        self.prompt_tokens = Counter("chatlm_prompt_tokens_total", "prompt tokens admitted")
        self.generation_tokens = Counter("chatlm_generation_tokens_total", "tokens generated")
        self.steps = Counter("chatlm_decode_steps_total", "engine steps taken")
        self.running = Gauge("chatlm_num_requests_running", "sequences holding a cache slot", running)
        self.waiting = Gauge("chatlm_num_requests_waiting", "sequences queued for a free slot", waiting)
        self.peak = Gauge("chatlm_max_requests_running", "the most sequences that decoded together", peak)
        self.batch = Histogram("chatlm_batch_size", "running sequences per engine step", BATCH_BUCKETS)
        self.ttft = Histogram("chatlm_time_to_first_token_seconds", "submission to first token", TTFT_BUCKETS)
        self.tpot = Histogram(
            "chatlm_time_per_output_token_seconds", "time between consecutive tokens of a sequence", TPOT_BUCKETS
        )
        self.e2e = Histogram("chatlm_e2e_request_latency_seconds", "submission to the last token", E2E_BUCKETS)

    def render(self) -> str:
        parts: list[Counter | Gauge | Histogram] = [
            self.requests,
            self.finished,
            self.prompt_tokens,
            self.generation_tokens,
            self.steps,
            self.running,
            self.waiting,
            self.peak,
            self.batch,
            self.ttft,
            self.tpot,
            self.e2e,
        ]
        return "\n".join(line for metric in parts for line in metric.render()) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value of a text exposition (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
