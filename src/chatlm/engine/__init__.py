"""Inference: batched KV-cache sampling and nanochat's training-time text samples."""

from chatlm.engine.generate import SAMPLE_PROMPTS, generate, sample_next, sample_texts

__all__ = ["SAMPLE_PROMPTS", "generate", "sample_next", "sample_texts"]
