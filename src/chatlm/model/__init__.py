"""The GPT model: sizing from the config, attention backends, and the network."""

from chatlm.model.attention import (
    BACKENDS,
    backend_unavailable_reason,
    causal_attention,
    prepare_backend,
    select_backend,
    select_inference_backend,
)
from chatlm.model.gpt import GPT, Linear
from chatlm.model.sizing import ModelDims, derive_dims

__all__ = [
    "BACKENDS",
    "GPT",
    "Linear",
    "ModelDims",
    "backend_unavailable_reason",
    "causal_attention",
    "derive_dims",
    "prepare_backend",
    "select_backend",
    "select_inference_backend",
]
