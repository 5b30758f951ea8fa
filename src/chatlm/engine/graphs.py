"""CUDA graphs of the engine's decode step, one per (batch bucket, attention span, sampler variant).

Eager decoding of a small model is bound by kernel launches: every layer is a few dozen small
kernels, and the host issues them one by one. A graph replays the whole step (forward, sampling,
the cache writes and position updates) with one launch. The step reads and writes only tensors
that keep their addresses (the cache, the per-slot tokens and sampler settings), so a captured
graph stays valid; buckets bound how many graphs there are (powers of two for the batch,
multiples of `span_step` for the span).

With `compile=True` the step is first compiled by Inductor (dynamic shapes: one compilation
serves every bucket), which fuses the norms, residual adds and sampler's element-wise work that
would otherwise be a few hundred tiny kernels; the graph then replays the compiled kernels.

Capture needs one eager warm-up run first (cuBLAS and allocator state), and that run really
changes the per-slot state (positions, next tokens, smear state, sampler steps); it is saved and
restored around it. The keys it writes are the ones the replay writes again, with the same values.
"""

from __future__ import annotations

from typing import Any

import torch


class DecodeGraphs:
    def __init__(self, engine: Any, compile: bool = False):
        self.engine = engine
        self.graphs: dict[tuple[int, int, str], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self.captures = 0
        self.step_fn = engine.decode_step
        if compile:
            self.step_fn = torch.compile(engine.decode_step, dynamic=True)

    def run(self, n: int, span: int, variant: str) -> None:
        key = (n, span, variant)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(n, span, variant)
        graph.replay()

    def _state(self) -> list[torch.Tensor]:
        e = self.engine
        return [e.cache.pos, e.cache.tokens, e.cache.prev, e.steps]

    def _capture(self, n: int, span: int, variant: str) -> torch.cuda.CUDAGraph:
        saved = [t.clone() for t in self._state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step_fn(n, span, variant)  # compiles here too, outside the capture
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step_fn(n, span, variant)
        self.captures += 1
        return graph
