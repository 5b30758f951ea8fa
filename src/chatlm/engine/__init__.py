"""Inference: the batched KV-cache engine, sampling, tool calls and plain `generate`."""

from chatlm.engine.engine import Completion, Engine, Event, RequestError, SamplingParams
from chatlm.engine.generate import SAMPLE_PROMPTS, generate, sample_texts

__all__ = [
    "SAMPLE_PROMPTS",
    "Completion",
    "Engine",
    "Event",
    "RequestError",
    "SamplingParams",
    "generate",
    "sample_texts",
]
