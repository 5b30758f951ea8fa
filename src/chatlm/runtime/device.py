"""Device and precision policy: which device, which compute dtype and why, TF32, seeding, compile.

A `DevicePolicy` is an object handed to whoever needs it: nothing is decided at import time
(nanochat resolves its COMPUTE_DTYPE once at import; tests then have to patch module globals).
Master weights stay fp32; the compute dtype is what activations and embeddings use.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

from chatlm.config import ConfigError, DType, HardwareConfig, PrecisionConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def choose_dtype(
    requested: str, device_type: str, capability: Optional[tuple[int, int]] = None
) -> tuple[torch.dtype, str]:
    """The compute dtype for `requested` ('auto' or a dtype name) on a device, with the reason.

    auto: bf16 on CUDA with compute capability >= 8.0 (Ampere and newer), fp32 everywhere else
    (pre-Ampere CUDA has no fast bf16; CPU and MPS run fp32 best).
    """
    if requested != "auto":
        if requested not in _DTYPES:
            raise ConfigError("precision.dtype", f"unknown dtype {requested!r}; valid: auto, {', '.join(_DTYPES)}")
        if requested == "float16" and device_type != "cuda":
            raise ConfigError("precision.dtype", "float16 compute is only supported on CUDA (use bfloat16 or float32)")
        return _DTYPES[requested], "set by precision.dtype"
    if device_type == "cuda":
        if capability is None:
            capability = torch.cuda.get_device_capability()
        if capability >= (8, 0):
            return torch.bfloat16, f"auto: CUDA SM {capability[0]}{capability[1]} >= 80 has fast bf16"
        return torch.float32, f"auto: CUDA SM {capability[0]}{capability[1]} < 80 has no fast bf16"
    return torch.float32, f"auto: {device_type} computes in fp32"


@dataclass(frozen=True)
class DevicePolicy:
    """How one rank computes."""

    device: torch.device
    compute_dtype: torch.dtype
    dtype_reason: str
    tf32: bool = True
    compile: bool = False
    fp8: bool = False
    compile_mode: Optional[str] = None
    deterministic: bool = False

    @classmethod
    def create(cls, hardware: HardwareConfig, precision: PrecisionConfig, device: torch.device) -> DevicePolicy:
        requested = precision.dtype.value if isinstance(precision.dtype, DType) else str(precision.dtype)
        dtype, reason = choose_dtype(requested, device.type)
        fp8 = bool(precision.fp8)
        if fp8 and device.type != "cuda":
            raise ConfigError(
                "precision.fp8", f"fp8 linears need a CUDA GPU (SM >= 89); this rank runs on {device.type}"
            )
        compile_ = bool(hardware.compile) and device.type == "cuda"
        return cls(
            device,
            dtype,
            reason,
            bool(hardware.tf32),
            compile_,
            fp8,
            hardware.compile_mode,
            bool(hardware.deterministic),
        )

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "compute_dtype": self.dtype_name,
            "dtype_reason": self.dtype_reason,
            "tf32": self.tf32,
            "compile": self.compile,
            "compile_mode": self.compile_mode,
            "fp8": self.fp8,
            "deterministic": self.deterministic,
        }

    def apply(self, seed: int) -> None:
        """Set the process-wide torch switches this policy implies and seed every RNG."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        if self.deterministic:
            make_deterministic()
        seed_everything(seed)

    def maybe_compile(self, module: Any, **kwargs: Any) -> Any:
        return torch.compile(module, **kwargs) if self.compile else module

    def compile_model(self, model: Any) -> Any:
        """The model under torch.compile with `hardware.compile_mode` (static shapes), or as is."""
        return self.maybe_compile(model, dynamic=False, mode=self.compile_mode)


def make_deterministic() -> None:
    """Bitwise-repeatable runs on one machine (`hardware.deterministic`), at some speed cost.

    torch's deterministic algorithms (Inductor then falls back to eager kernels for the scatter-adds
    of the embedding backward, which it otherwise compiles to atomic adds), cuBLAS with a fixed
    workspace (read when the first cuBLAS handle is made, so this must run before any matmul), and
    cuDNN without autotuning. An op with no deterministic version warns (warn_only) instead of
    stopping the run; its warning names it.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = True  # no on-device benchmarking that can change numerics


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) RNGs from one seed."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)
