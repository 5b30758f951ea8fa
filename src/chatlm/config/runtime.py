"""Groups that say where and how a run executes: `hardware/`, `precision/`, `logger/`, `paths/`,
and the small nodes the preset groups fill (`cluster/`, `experiment/`, `sweep/`, `debug/`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import List, Optional

from chatlm.config.fields import setting
from chatlm.errors import ConfigError


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, enum.Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class LoggerKind(str, enum.Enum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


#: torch.compile modes `hardware.compile_mode` accepts (None: torch's default mode)
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass
class HardwareConfig:
    """Where ranks run: device kind, ranks per node, per-rank batch, compile."""

    name: str = setting("cpu", "tag used in comparisons")
    device: Device = setting(Device.auto, "auto (the first GPU, else Apple MPS, else the CPU) | cpu | cuda | mps")
    nproc_per_node: int = setting(1, "ranks per node: spawned by chatlm, or started by torchrun / Slurm")
    nnodes: int = setting(1, "nodes of a multi-node job (Slurm presets)")
    device_batch_size: int = setting(
        32, "sequences per rank per micro-step; gradient accumulation makes up the rest of the batch (nanochat: 32)"
    )
    compile: bool = setting(False, "torch.compile the model and optimizer (CUDA only; ignored elsewhere)")
    compile_mode: Optional[str] = setting(
        None,
        "torch.compile mode: null (torch's default), default, "
        "max-autotune-no-cudagraphs, max-autotune or reduce-overhead",
    )
    tf32: bool = setting(True, "TF32 matmuls for fp32 work on CUDA")
    deterministic: bool = setting(False, "bitwise-repeatable GPU runs (deterministic kernels; about 3 % slower)")
    peak_flops: Optional[float] = setting(None, "dense bf16 peak FLOP/s per device for MFU; null = look up the GPU")
    measured_flops: Optional[float] = setting(None, "a measured matmul ceiling (FLOP/s) for the bench's second MFU")

    def __post_init__(self) -> None:
        for key in ("nproc_per_node", "nnodes", "device_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"hardware.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                "hardware.compile_mode",
                f"must be one of {', '.join(map(str, COMPILE_MODES))}, got {self.compile_mode!r}",
            )
        for key in ("peak_flops", "measured_flops"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"hardware.{key}", f"must be > 0 FLOP/s (or null), got {value}")


@dataclass
class PrecisionConfig:
    """Compute dtype (fp32 master weights are kept regardless) and fp8 linears."""

    name: str = setting("auto", "tag used in comparisons")
    dtype: DType = setting(
        DType.auto, "compute dtype: auto (bf16 on CUDA SM >= 80, else fp32) | bfloat16 | float16 | float32"
    )
    fp8: bool = setting(False, "tensorwise-scaled fp8 for the large linears (CUDA SM >= 89)")
    fp8_recipe: str = setting("tensorwise", "fp8 scaling recipe; only tensorwise (nanochat's default) exists")

    def __post_init__(self) -> None:
        if self.fp8_recipe != "tensorwise":
            raise ConfigError("precision.fp8_recipe", f"only 'tensorwise' is implemented, got {self.fp8_recipe!r}")


@dataclass
class LoggerConfig:
    """Extra metric sinks. metrics.jsonl in the run directory is always written."""

    name: str = setting("none", "tag of the preset")
    kind: LoggerKind = setting(LoggerKind.none, "none | wandb | tensorboard")
    project: str = setting("chatlm", "W&B project")
    entity: Optional[str] = setting(None, "W&B team or user; null = your default")
    group: Optional[str] = setting(None, "W&B group; null = the sweep directory's name for sweep jobs")
    wandb_mode: WandbMode = setting(
        WandbMode.offline, "offline (files in the run directory, `wandb sync` later) | online | disabled"
    )
    tags: List[str] = setting(help="W&B tags", factory=list)


@dataclass
class PathsConfig:
    """Where outputs, caches, data and tokenizers live (CHATLM_OUTPUT_ROOT, CHATLM_CACHE_DIR)."""

    output_root: str = setting("outputs", "run and sweep directories (relative paths: from the launch directory)")
    cache_dir: str = setting("~/.cache/chatlm", "downloads and built artifacts")
    data_dir: str = setting("~/.cache/chatlm/data", "parquet shard sets, one folder per source")
    tokenizer_dir: str = setting("~/.cache/chatlm/tokenizer", "trained tokenizers, one folder per name")


@dataclass
class ClusterInfo:
    """Set by `cluster=<preset>` (launcher + hardware + MULTIRUN); `local` runs in this process."""

    name: str = setting("local", "which cluster preset ran")
    description: str = setting("run in this process (no launcher)", "what the preset does")


@dataclass
class ExperimentInfo:
    """Set by `experiment=<name>`: a named, versioned set of overrides."""

    name: str = setting("none", "which experiment ran")
    description: str = setting("", "what the experiment is")


@dataclass
class SweepInfo:
    """Set by `sweep=<name>`: a named grid in hydra.sweeper.params."""

    name: str = setting("none", "which named sweep ran")
    description: str = setting("", "what the sweep varies")


@dataclass
class DebugInfo:
    """Set by `debug=<preset>`: shrinks a run for smoke tests, overfitting or profiling."""

    name: str = setting("none", "which debug preset ran")
    description: str = setting("", "what the preset does")
