"""The inference engine: many sequences with different prompts decoding together, joining and
leaving between steps (the basis of continuous batching), with tool calls, stop conditions,
streaming and cancellation.

    engine = Engine(model, tokenizer, max_batch=32)
    rid = engine.add(prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, top_k=50))
    for event in engine.stream():       # or: while engine.has_work(): engine.step()
        print(event.text, end="")

One `step()`: launch one decode step for every running sequence, read back the tokens of the step
before and turn them into events, then admit waiting requests into free cache slots (one batched
prefill, which also samples each one's first token, returned by the same call: an idle engine's
time to first token is the prefill alone). Reading the previous step while the current one runs
means the host never waits for the device between steps; the price is that a sequence that has
just finished computes one extra, discarded step. A forced token (the result of a tool call)
replaces the token its step sampled before the next step reads it.

On CUDA each decode step is one CUDA graph replay per (batch bucket, attention span, sampler
variant), captured on first use (`chatlm.engine.graphs`). The batch bucket is the next power of two
over the highest busy slot; the span covers the longest running sequence, in multiples of
`span_step`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from chatlm.engine.kv_cache import DecodeView, PrefillView, SlotCache
from chatlm.engine.sampling import check_sampling, sample, variant_for
from chatlm.engine.text import TextStream
from chatlm.errors import ChatlmError

RequestId = Union[int, str]


class RequestError(ChatlmError, ValueError):
    """A request the engine cannot run; `field` names the offending request field."""

    label = "bad request"

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued."""

    max_tokens: int = 256  # new tokens at most (tool outputs count); capped by the context
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # nucleus: the smallest set of tokens with this much probability; 1 = no limit
    seed: Optional[int] = None  # None: drawn from torch's global RNG (so torch.manual_seed repeats it)
    stop: tuple[str, ...] = ()  # stop strings: the text ends just before the first one
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence (not part of the output)


@dataclass(frozen=True)
class Event:
    """A new token of a request (`token`, `text` = the text it completes), or its end (`finish_reason`)."""

    request_id: RequestId
    token: Optional[int]
    text: str
    finish_reason: Optional[str] = None  # None while running; "stop" | "length" | "cancelled" | "error"
    forced: bool = False  # a tool output token, not sampled
    error: Optional[str] = None  # finish_reason "error": what failed (this request only; the others go on)


@dataclass
class Completion:
    request_id: RequestId
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


@dataclass(eq=False)
class _Sequence:
    id: RequestId
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int
    stop_ids: frozenset[int]
    text: TextStream
    slot: int = -1
    out: list[int] = field(default_factory=list)
    forwarded: int = 0  # tokens fed to the model after the prompt
    forced: deque = field(default_factory=deque)
    override: Optional[int] = None  # the forced token that replaced the in-flight step's sample
    finished: bool = False


@dataclass
class _Launched:
    rows: list[tuple[int, _Sequence]]
    host: torch.Tensor
    event: Optional[Any]


def cast_for_inference(model: Any) -> Any:
    """Store the Linear weights in the compute dtype (bf16 on GPU) instead of fp32 masters: every
    decode step reads each weight once, and a cast per call would read 4 bytes and write 2 more.
    Each attention's q, k, v weights become views of one concatenated tensor (no copy per call).
    For models that will not be trained again (chat, serving, benchmarks)."""
    dtype = model.compute_dtype
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.to(dtype)
    for module in model.modules():
        if hasattr(module, "fuse_qkv_weights"):
            module.fuse_qkv_weights()
    return model


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _variant(seqs: Iterable[_Sequence]) -> str:
    return variant_for((s.params.temperature, s.params.top_k, s.params.top_p) for s in seqs)


def _bucket(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, n - 1).bit_length())


class Engine:
    """Batched KV-cache generation over a `GPT` (module docstring).

    `tokenizer`: needed for text (events' `text`, stop strings) and tool calls; without it events
    carry tokens only. `tools`: a `chatlm.engine.tools.ToolTokens` (the calculator protocol), or
    None. `max_len`: tokens a sequence may hold, prompt included (default the model's training
    context). `cuda_graphs`: None = on for CUDA models. `compile_decode`: the graphed decode step is
    compiled by Inductor first (fewer, fused kernels; a compilation at the first step)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_batch: int = 32,
        max_len: Optional[int] = None,
        tools: Any = None,
        cuda_graphs: Optional[bool] = None,
        compile_decode: bool = False,
        span_step: int = 256,
        prefill_tokens: int = 16384,
    ):
        if max_batch < 1:
            raise RequestError("max_batch", f"must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.device = _model_device(model)
        rope = int(model.cos.size(1))
        self.max_len = min(int(max_len or model.dims.sequence_len), rope)
        self.vocab_size = int(model.dims.vocab_size)
        self.cache = SlotCache(model, max_batch, self.max_len, self.device)
        S, dev = max_batch, self.device
        self.temperature = torch.zeros(S, device=dev)
        self.top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self.top_p = torch.ones(S, device=dev)
        self.seeds = torch.zeros(S, dtype=torch.long, device=dev)
        self.steps = torch.zeros(S, dtype=torch.long, device=dev)
        self.span_step = span_step
        self.prefill_tokens = prefill_tokens
        self._free = list(range(S))
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}
        self._by_id: dict[RequestId, _Sequence] = {}
        self._events: list[Event] = []
        self._pending: Optional[_Launched] = None
        self._ids = itertools.count()
        pin = self.device.type == "cuda"
        self._host = [torch.zeros(S, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = None
        if use_graphs:
            from chatlm.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, compile=compile_decode)
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "decoded_tokens": 0}

    # ------------------------------------------------------------------------------------------
    # requests

    def add(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), request_id: Any = None) -> Any:
        """Queue a request; returns its id. Bad input raises RequestError naming the field."""
        ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("prompt", "is empty (a prompt needs at least one token, e.g. BOS)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestError("prompt", f"token ids must be in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_len:
            raise RequestError(
                "prompt",
                f"has {len(ids)} tokens; the context holds {self.max_len}, so at most {self.max_len - 1} leave room "
                "for an answer",
            )
        if params.max_tokens <= 0:
            raise RequestError("max_tokens", f"must be >= 1, got {params.max_tokens}")
        bad = check_sampling(params.temperature, params.top_k, params.top_p)
        if bad:
            raise RequestError(*bad)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need the engine's tokenizer")
        if any(not s for s in params.stop):
            raise RequestError("stop", "stop strings must not be empty")
        request_id = next(self._ids) if request_id is None else request_id
        if request_id in self._by_id:
            raise RequestError("request_id", f"{request_id!r} is already running")
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        seq = _Sequence(
            id=request_id,
            prompt=ids,
            params=params,
            max_tokens=min(params.max_tokens, self.max_len - len(ids)),
            seed=int(seed),
            stop_ids=frozenset(int(t) for t in params.stop_token_ids),
            text=TextStream(self.tokenizer, params.stop),
        )
        self._waiting.append(seq)
        self._by_id[request_id] = seq
        return request_id

    def cancel(self, request_id: Any) -> bool:
        """Stop a request now (its slot is free for the next step); False when it is not known."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.finished:
            return False
        if seq in self._waiting:
            self._waiting.remove(seq)
        self._finish(seq, "cancelled")
        return True

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._pending or self._events)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------
    # stepping

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit, decode one step, and return the events that are ready (module docstring)."""
        from chatlm.engine.padded import inference_attention

        with inference_attention(self.model):
            launched = self._launch() if self._running else None
            if self._pending is not None:
                self._collect(self._pending)
            self._pending = launched
            self._admit()  # last: a new request's first token is returned by this very call
        events, self._events = self._events, []
        return events

    def stream(self) -> Iterator[Event]:
        """Step until every request has finished, yielding events as they come."""
        while self.has_work():
            yield from self.step()

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams = SamplingParams()) -> list[Completion]:
        """Run `prompts` to completion (with any requests already queued); results in input order."""
        ids = [self.add(p, params) for p in prompts]
        seqs = {i: self._by_id[i] for i in ids}
        reasons: dict[Any, str] = {}
        for event in self.stream():
            if event.finish_reason is not None and event.request_id in seqs:
                reasons[event.request_id] = event.finish_reason
        return [Completion(i, list(seqs[i].out), seqs[i].text.text, reasons[i], len(seqs[i].prompt)) for i in ids]

    # ------------------------------------------------------------------------------------------
    # internals

    def _admit(self) -> None:
        """Prefill as many waiting requests as there are free slots (and prefill budget)."""
        batch: list[_Sequence] = []
        longest = 0
        while self._waiting and self._free:
            seq = self._waiting[0]
            longest2 = max(longest, len(seq.prompt))
            if batch and longest2 * (len(batch) + 1) > self.prefill_tokens:
                break
            self._waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            self._running[seq.slot] = seq
            batch.append(seq)
            longest = longest2
        if not batch:
            return
        cache, dev = self.cache, self.device
        slots = [s.slot for s in batch]
        lengths = [len(s.prompt) for s in batch]
        idx = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, s in enumerate(batch):
            idx[b, : len(s.prompt)] = torch.tensor(s.prompt)
        at = torch.tensor(slots, device=dev)
        self.temperature[at] = torch.tensor([s.params.temperature for s in batch], device=dev)
        self.top_k[at] = torch.tensor([s.params.top_k for s in batch], device=dev)
        self.top_p[at] = torch.tensor([s.params.top_p for s in batch], device=dev)
        self.seeds[at] = torch.tensor([s.seed for s in batch], device=dev)
        self.steps[at] = 0
        view = PrefillView(cache, slots, lengths)
        hidden = self.model.final_hidden(idx.to(dev), view)
        last = hidden[torch.arange(len(batch), device=dev), view.last_positions()]
        logits = self.model.head_logits(last)
        first = sample(
            logits,
            self.temperature[at],
            self.top_k[at],
            self.top_p[at],
            self.seeds[at],
            self.steps[at],
            _variant(batch),
        )
        cache.tokens[at] = first
        cache.active[at] = True
        self.steps[at] = 1
        self.stats["prefill_tokens"] += sum(lengths)
        for seq, token in zip(batch, first.tolist()):
            self._accept(seq, int(token), forced=False)

    def _launch(self) -> _Launched:
        """Apply forced tokens, then start one decode step for every running sequence."""
        pending = {id(s) for _, s in self._pending.rows} if self._pending is not None else set()
        patches = []
        for slot, seq in self._running.items():
            if seq.forced and id(seq) in pending:
                seq.override = seq.forced.popleft()
                patches.append((slot, seq.override))
        if patches:
            rows = torch.tensor([p[0] for p in patches], device=self.device)
            self.cache.tokens[rows] = torch.tensor([p[1] for p in patches], device=self.device)
        n = _bucket(max(self._running) + 1, self.cache.slots)
        reach = max(len(s.prompt) + s.forwarded for s in self._running.values()) + 1
        span = min(self.max_len, -(-reach // self.span_step) * self.span_step)
        variant = _variant(self._running.values())
        if self.graphs is not None:
            self.graphs.run(n, span, variant)
        else:
            self.decode_step(n, span, variant)
        for seq in self._running.values():
            seq.forwarded += 1
        self.stats["decode_steps"] += 1
        host = self._host[self._flip][:n]  # two buffers: the previous step's is still being read
        self._flip ^= 1
        host.copy_(self.cache.tokens[:n], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return _Launched(sorted(self._running.items()), host, event)

    def decode_step(self, n: int, span: int, variant: str) -> None:
        """Forward each slot's next token, sample the one after it into `cache.tokens` (device only)."""
        cache = self.cache
        view = DecodeView(cache, n, span)
        hidden = self.model.final_hidden(cache.tokens[:n].view(n, 1), view)
        logits = self.model.head_logits(hidden[:, 0])
        tokens = sample(
            logits, self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seeds[:n], self.steps[:n], variant
        )
        cache.tokens[:n].copy_(tokens)
        self.steps[:n].add_(cache.active[:n].long())

    def _collect(self, launched: _Launched) -> None:
        """Turn a finished step's tokens into events."""
        if launched.event is not None:
            launched.event.synchronize()
        tokens = launched.host.tolist()
        for slot, seq in launched.rows:
            if seq.finished:
                continue
            token, forced = tokens[slot], False
            if seq.override is not None:
                token, forced, seq.override = seq.override, True, None
            self.stats["decoded_tokens"] += 1
            self._accept(seq, int(token), forced)

    def _accept(self, seq: _Sequence, token: int, forced: bool) -> None:
        """Append one token to a sequence. A failure of this sequence's own work (its text, its tool
        call) ends it with finish_reason "error" and leaves the other sequences running."""
        try:
            self._accept_token(seq, token, forced)
        except Exception as e:
            if not seq.finished:
                seq.finished = True
                self._events.append(Event(seq.id, None, "", "error", error=f"{type(e).__name__}: {e}"))
                self._release(seq)

    def _accept_token(self, seq: _Sequence, token: int, forced: bool) -> None:
        if not forced and token in seq.stop_ids:
            self._finish(seq, "stop")
            return
        seq.out.append(token)
        if self.tools is not None and token == self.tools.python_end and not forced:
            seq.forced.extend(self.tools.forced_after(seq.out))
        text, stopped = seq.text.push(token)
        if stopped:
            self._finish(seq, "stop", token, text, forced)
        elif len(seq.out) >= seq.max_tokens:
            self._finish(seq, "length", token, text, forced)
        else:
            self._events.append(Event(seq.id, token, text, None, forced))

    def _finish(self, seq: _Sequence, reason: str, token: Optional[int] = None, text: str = "", forced=False) -> None:
        text += seq.text.flush()  # first: when it raises, _accept fails the still-unfinished sequence
        seq.finished = True
        if token is not None:
            self._events.append(Event(seq.id, token, text, reason, forced))
        else:
            self._events.append(Event(seq.id, None, text, reason))
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free a finished sequence's slot and id."""
        if seq.slot >= 0 and self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self.cache.active[seq.slot] = False
            heapq.heappush(self._free, seq.slot)
        if self._by_id.get(seq.id) is seq:
            del self._by_id[seq.id]
