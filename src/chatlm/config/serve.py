"""The serving stage's schema (`conf/serve.yaml`): `python -m chatlm.serve ckpt=<run | checkpoint>`.

Serving has no optimizer and no data: the model and its tokenizer come from the checkpoint
(`chatlm.runtime.model_loading.load_model`). The keys say where to listen, how many sequences
decode together, how many requests may wait, and what a request gets when it does not say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from chatlm.config.fields import setting
from chatlm.config.stages import StageConfig
from chatlm.errors import ConfigError


def _at_least(value: int, low: int, key: str) -> None:
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


@dataclass
class ServeConfig(StageConfig):
    """`python -m chatlm.serve`: an OpenAI-compatible HTTP API and a web chat page for a checkpoint."""

    stage: str = setting("serve", "stage name")
    ckpt: str = setting("", "the model served: a run directory (its checkpoints/latest) or a checkpoint directory")
    tokenizer_dir: Optional[str] = setting(None, "the tokenizer, for checkpoints that do not carry one")
    host: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 = every interface", results=False)
    port: int = setting(8000, "TCP port; 0 = any free port (the URL is printed at start)", results=False)
    model_name: str = setting(
        "", "the model id of /v1/models and requests; empty = <run name>-step<N> of the checkpoint", results=False
    )
    max_batch: int = setting(32, "sequences decoding together (the engine's cache slots)", results=False)
    max_queue: int = setting(
        256, "sequences that may wait for a free slot; a request beyond that gets 429 with Retry-After", results=False
    )
    retry_after_s: int = setting(1, "the Retry-After header (seconds) of a 429 answer", results=False)
    max_tokens_cap: int = setting(4096, "the most new tokens one request may ask for (more: 400)", results=False)
    max_tokens: int = setting(512, "new tokens of a request that does not say (never past the context)")
    temperature: float = setting(0.8, "sampling temperature of a request that does not say; 0 = greedy")
    top_k: int = setting(50, "top-k of a request that does not say; 0 = no limit")
    top_p: float = setting(1.0, "nucleus top-p of a request that does not say; 1 = off")
    max_messages: int = setting(500, "messages one chat request may hold", results=False)
    max_message_chars: int = setting(8000, "characters one message (or completion prompt) may hold", results=False)
    max_prompt_chars: int = setting(32000, "characters all messages of one request may hold together", results=False)
    tools: bool = setting(True, "chat requests: run the calculator when the model calls it")
    cuda_graphs: Optional[bool] = setting(None, "decode steps as CUDA graphs; null = on for CUDA", results=False)
    request_log: bool = setting(True, "append one JSON line per request to requests.jsonl in the run directory")
    access_log: bool = setting(False, "print uvicorn's access log line for every HTTP request", results=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.ckpt).strip():
            raise ConfigError(
                "ckpt", "say which model to serve: ckpt=<run dir | checkpoint dir>, e.g. ckpt=outputs/train/latest"
            )
        if not str(self.host).strip():
            raise ConfigError("host", "must name an address, e.g. 127.0.0.1 or 0.0.0.0")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in [0, 65535] (0 = any free port), got {self.port}")
        _at_least(self.max_batch, 1, "max_batch")
        _at_least(self.max_queue, 0, "max_queue")
        _at_least(self.retry_after_s, 0, "retry_after_s")
        _at_least(self.max_tokens_cap, 1, "max_tokens_cap")
        _at_least(self.max_tokens, 1, "max_tokens")
        if self.max_tokens > self.max_tokens_cap:
            raise ConfigError("max_tokens", f"must be <= max_tokens_cap ({self.max_tokens_cap}), got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        _at_least(self.top_k, 0, "top_k")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        _at_least(self.max_messages, 1, "max_messages")
        _at_least(self.max_message_chars, 1, "max_message_chars")
        _at_least(self.max_prompt_chars, 1, "max_prompt_chars")
        for key in ("nproc_per_node", "nnodes"):
            if getattr(self.hardware, key) != 1:
                raise ConfigError(
                    f"hardware.{key}",
                    f"must be 1: the server is one process on one device, got {getattr(self.hardware, key)}",
                )
