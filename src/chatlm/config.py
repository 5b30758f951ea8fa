"""Typed configuration schemas for every chatlm stage and config group.

These are plain dataclasses: the library imports them freely and never needs Hydra. The Hydra
edge (`chatlm.app`) registers them in Hydra's ConfigStore, so every YAML file in `conf/` is merged
into a typed node: a typo in a key, a value of the wrong type or an unknown enum value fails at
composition time with the key's full name.

Defaults are nanochat's values (see docs/configs.md for where each comes from). Fields whose
default is `None` are derived in code (from the depth, the tokenizer or the sequence length) and
the derived value is written into the run directory's `config.resolved.yaml` under `derived:`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from chatlm.errors import ChatlmError


class ConfigError(ChatlmError, ValueError):
    """A configuration value that parses but makes no sense. The message names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


# ----------------------------------------------------------------------------------------------
# enums (OmegaConf checks membership and lists the valid values on a bad one)


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


class AttentionBackend(str, enum.Enum):
    auto = "auto"
    fa4 = "fa4"
    flex = "flex"
    sdpa = "sdpa"


class KernelChoice(str, enum.Enum):
    """A fused kernel or nanochat's plain expression (auto: fused on CUDA with Triton)."""

    auto = "auto"
    fused = "fused"
    plain = "plain"


class QKVMatmul(str, enum.Enum):
    auto = "auto"
    fused = "fused"
    separate = "separate"


class OptimKind(str, enum.Enum):
    muon_adamw = "muon_adamw"
    adamw = "adamw"


class ScheduleKind(str, enum.Enum):
    warmdown = "warmdown"
    cosine = "cosine"
    constant = "constant"


class LoggerKind(str, enum.Enum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class DataKind(str, enum.Enum):
    embedded = "embedded"
    offline_registry = "offline_registry"
    climbmix = "climbmix"
    fineweb_edu = "fineweb_edu"
    synthetic = "synthetic"
    local = "local"


# ----------------------------------------------------------------------------------------------
# groups


@dataclass
class ModelConfig:
    """GPT architecture. Width, heads and windows are derived from `depth` (see chatlm.model)."""

    name: str = "d20"
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_head: Optional[int] = None
    sequence_len: int = 2048
    vocab_size: Optional[int] = None
    vocab_pad_multiple: int = 64
    window_pattern: str = "SSSL"
    short_window: Optional[int] = None
    short_window_divisor: int = 4
    window_round: int = 128
    softcap: float = 15.0
    qk_scale: float = 1.2
    rope_base: float = 100000.0
    rope_table_factor: int = 10
    value_embeds: bool = True
    ve_gate_channels: int = 12
    ve_gate_range: float = 3.0
    ve_gate_init: float = 0.02
    smear: bool = True
    smear_channels: int = 24
    smear_gate_init: float = 0.02
    backout: bool = True
    backout_layer: Optional[int] = None
    backout_init: float = 0.2
    wte_init_std: float = 0.8
    lm_head_init_std: float = 0.001
    fc_init_scale: float = 0.4
    resid_lambda_start: float = 1.15
    resid_lambda_end: float = 1.05
    x0_lambda_start: float = 0.20
    x0_lambda_end: float = 0.05
    attention_backend: AttentionBackend = AttentionBackend.auto
    loss_kernel: KernelChoice = KernelChoice.auto
    qkv_matmul: QKVMatmul = QKVMatmul.auto
    rope_kernel: KernelChoice = KernelChoice.auto

    def __post_init__(self) -> None:
        for key in (
            "depth",
            "aspect_ratio",
            "head_dim",
            "sequence_len",
            "vocab_pad_multiple",
            "short_window_divisor",
            "window_round",
            "rope_table_factor",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", f"must be >= 1, got {getattr(self, key)}")
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise ConfigError(
                "model.window_pattern",
                f"must be a non-empty string of S (short) and L (long), got {self.window_pattern!r}",
            )
        if self.short_window is not None and not 0 < self.short_window <= self.sequence_len:
            raise ConfigError(
                "model.short_window", f"must be in [1, sequence_len={self.sequence_len}], got {self.short_window}"
            )
        if self.backout_layer is not None and not 0 <= self.backout_layer < self.depth:
            raise ConfigError("model.backout_layer", f"must be in [0, depth={self.depth}), got {self.backout_layer}")
        if self.softcap < 0:
            raise ConfigError("model.softcap", f"must be >= 0 (0 disables it), got {self.softcap}")


@dataclass
class OptimConfig:
    """MuonAdamW (nanochat) or plain AdamW. LRs are given at the d12 reference batch size."""

    name: str = "muon_adamw"
    kind: OptimKind = OptimKind.muon_adamw
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28
    adam_eps: float = 1e-10
    lm_head_betas: List[float] = field(default_factory=lambda: [0.8, 0.96])
    lm_head_wd: float = 0.01
    wte_betas: List[float] = field(default_factory=lambda: [0.8, 0.995])
    wte_wd: float = 0.001
    ve_lr_mult: float = 0.5
    ve_betas: List[float] = field(default_factory=lambda: [0.8, 0.995])
    ve_wd: float = 0.01
    resid_lr_mult: float = 0.01
    resid_betas: List[float] = field(default_factory=lambda: [0.8, 0.95])
    resid_wd: float = 0.05
    x0_betas: List[float] = field(default_factory=lambda: [0.96, 0.95])
    x0_wd: float = 0.0
    gate_lr: float = 0.2
    gate_betas: List[float] = field(default_factory=lambda: [0.8, 0.95])
    gate_wd: float = 0.0
    momentum_start: float = 0.85
    momentum: float = 0.97
    momentum_warmup_steps: int = 400
    momentum_end: float = 0.90
    ns_steps: int = 5
    ns_norm_factor: float = 1.01
    normuon_beta2: float = 0.9
    row_equalize: bool = True
    muon_plus: bool = True
    cautious_wd: bool = True
    dmodel_ref: int = 768
    reference_depth: int = 12
    reference_batch_tokens: int = 524288
    batch_size_exponent: float = 0.383

    def __post_init__(self) -> None:
        for key in ("lm_head_betas", "wte_betas", "ve_betas", "resid_betas", "x0_betas", "gate_betas"):
            betas = getattr(self, key)
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ConfigError(f"optim.{key}", f"must be two numbers in [0, 1), got {list(betas)}")
        if self.ns_steps < 1 or self.ns_steps > 5:
            raise ConfigError("optim.ns_steps", f"Polar Express has coefficients for 1..5 steps, got {self.ns_steps}")


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier over the run."""

    name: str = "warmdown"
    kind: ScheduleKind = ScheduleKind.warmdown
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmdown_ratio <= 1.0:
            raise ConfigError("schedule.warmdown_ratio", f"must be in [0, 1], got {self.warmdown_ratio}")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ConfigError("schedule.final_lr_frac", f"must be in [0, 1], got {self.final_lr_frac}")
        if self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class DataSourceConfig:
    """One shard set (parquet files with a `text` column; the last shard is validation)."""

    kind: DataKind = DataKind.embedded
    weight: float = 1.0
    path: Optional[str] = None
    url: Optional[str] = None
    num_shards: int = -1
    sha256_manifest: Optional[str] = None  # `sha256sum` file of the shards, checked after download
    download_workers: int = 4  # parallel downloads
    wait_timeout_s: float = 3600.0  # non-main ranks wait this long for the main rank's shards


@dataclass
class DataConfig:
    """Pretraining data: one or more weighted shard sets."""

    name: str = "embedded"
    sources: List[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig()])
    doc_buffer: int = 1000
    tokenizer_threads: int = 4

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources", "needs at least one source")
        if any(s.weight <= 0 for s in self.sources):
            raise ConfigError("data.sources", "every source weight must be > 0")


NANOCHAT_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

NANOCHAT_SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with rustbpe, used through tiktoken."""

    name: str = "bpe32k"
    vocab_size: int = 32768
    split_pattern: str = NANOCHAT_SPLIT_PATTERN
    special_tokens: List[str] = field(default_factory=lambda: list(NANOCHAT_SPECIAL_TOKENS))
    max_chars: int = 2_000_000_000
    doc_cap: int = 10_000
    dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(self.special_tokens):
            raise ConfigError(
                "tokenizer.vocab_size",
                f"must be >= 256 bytes + {len(self.special_tokens)} special tokens, got {self.vocab_size}",
            )


#: loss kernels `python -m chatlm.bench task=loss` can time (chatlm.bench.loss_bench)
LOSS_BENCH_KERNELS = ("plain", "fused", "fused_logits")

#: torch.compile modes `hardware.compile_mode` accepts (None: torch's default mode)
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass
class HardwareConfig:
    """Where ranks run: device kind, ranks per node, per-rank batch, compile."""

    name: str = "cpu"
    device: Device = Device.auto
    nproc_per_node: int = 1
    nnodes: int = 1
    device_batch_size: int = 32
    compile: bool = False
    compile_mode: Optional[str] = None
    tf32: bool = True
    deterministic: bool = False
    peak_flops: Optional[float] = None
    measured_flops: Optional[float] = None

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError("hardware.nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ConfigError("hardware.nnodes", f"must be >= 1, got {self.nnodes}")
        if self.device_batch_size < 1:
            raise ConfigError("hardware.device_batch_size", f"must be >= 1, got {self.device_batch_size}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                "hardware.compile_mode",
                f"must be one of {', '.join(map(str, COMPILE_MODES))}, got {self.compile_mode!r}",
            )


@dataclass
class PrecisionConfig:
    """Compute dtype (fp32 master weights are kept regardless) and fp8 linears."""

    name: str = "auto"
    dtype: DType = DType.auto
    fp8: bool = False
    fp8_recipe: str = "tensorwise"

    def __post_init__(self) -> None:
        if self.fp8_recipe != "tensorwise":
            raise ConfigError("precision.fp8_recipe", f"only 'tensorwise' is implemented, got {self.fp8_recipe!r}")


@dataclass
class LoggerConfig:
    """Extra metric sinks. metrics.jsonl in the run directory is always written."""

    name: str = "none"
    kind: LoggerKind = LoggerKind.none
    project: str = "chatlm"
    entity: Optional[str] = None
    group: Optional[str] = None
    wandb_mode: WandbMode = WandbMode.offline
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    """Where outputs, caches, data and tokenizers live."""

    output_root: str = "outputs"
    cache_dir: str = "~/.cache/chatlm"
    data_dir: str = "~/.cache/chatlm/data"
    tokenizer_dir: str = "~/.cache/chatlm/tokenizer"


@dataclass
class ClusterInfo:
    """Set by `cluster=<preset>` (launcher + hardware + MULTIRUN); `local` runs in this process."""

    name: str = "local"
    description: str = "run in this process (no launcher)"


@dataclass
class ExperimentInfo:
    """Set by `experiment=<name>`: a named, versioned set of overrides."""

    name: str = "none"
    description: str = ""


@dataclass
class SweepInfo:
    """Set by `sweep=<name>`: a named grid in hydra.sweeper.params."""

    name: str = "none"
    description: str = ""


@dataclass
class DebugInfo:
    """Set by `debug=<preset>`: shrinks a run for smoke tests, overfitting or profiling."""

    name: str = "none"
    description: str = ""


# ----------------------------------------------------------------------------------------------
# stage roots


@dataclass
class StageConfig:
    """Keys every stage has."""

    stage: str = "stage"
    run_name: str = "run"
    seed: int = 42
    resume: str = "auto"
    tags: List[str] = field(default_factory=list)
    paths: PathsConfig = field(default_factory=PathsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterInfo = field(default_factory=ClusterInfo)
    experiment: ExperimentInfo = field(default_factory=ExperimentInfo)
    sweep: SweepInfo = field(default_factory=SweepInfo)
    debug: DebugInfo = field(default_factory=DebugInfo)

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise ConfigError("run_name", f"must be a non-empty name without '/', got {self.run_name!r}")
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ConfigError("resume", "must be 'auto', 'never' or a checkpoint path")


@dataclass
class CheckConfig(StageConfig):
    """`python -m chatlm.check`: exercise the launch path (ranks, devices, run directory)."""

    stage: str = "check"
    matmul_size: int = 256
    matmul_iters: int = 10
    sleep_s: float = 0.0
    fail: bool = False


@dataclass
class TokenizeConfig(StageConfig):
    """`python -m chatlm.tokenize`: train the BPE tokenizer on the configured data."""

    stage: str = "tokenize"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_docs: int = 200
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_docs < 1:
            raise ConfigError("eval_docs", f"must be >= 1, got {self.eval_docs}")


@dataclass
class ModelStageConfig(StageConfig):
    """What every stage that builds and trains the model composes: model, optimizer, schedule,
    data and tokenizer groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class TrainConfig(ModelStageConfig):
    """`python -m chatlm.train`: pretraining (nanochat's base_train)."""

    stage: str = "train"
    steps: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 12.0
    total_batch_size: int = -1
    log_every: int = 1
    eval_every: int = 250
    eval_tokens: int = 80 * 524288
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    sample_every: int = 2000
    save_every: int = -1
    keep_checkpoints: int = -1
    init_from: Optional[str] = None
    auto_tokenizer: bool = False
    stop_at_step: int = -1
    overfit_batches: int = 0
    profile_steps: int = 0
    profile_start: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overfit_batches < 0 or self.profile_steps < 0 or self.profile_start < 0:
            key = next(k for k in ("overfit_batches", "profile_steps", "profile_start") if getattr(self, k) < 0)
            raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.steps == 0 or self.steps < -1:
            raise ConfigError("steps", f"must be -1 (derive the horizon) or >= 1, got {self.steps}")
        if self.steps == -1 and self.target_flops <= 0 and self.target_param_data_ratio <= 0:
            raise ConfigError("steps", "no horizon: set steps, target_flops or target_param_data_ratio > 0")
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise ConfigError("total_batch_size", f"must be -1 (auto) or >= 1, got {self.total_batch_size}")


@dataclass
class BenchConfig(ModelStageConfig):
    """`python -m chatlm.bench`: throughput/MFU of training steps (task=train), attention kernels
    (task=attention) or the loss head (task=loss), built exactly as training builds them; results go
    to bench.json."""

    stage: str = "bench"
    task: str = "train"
    tokens: str = "synthetic"
    steps: int = 30
    warmup_steps: int = 10
    total_batch_size: int = -1
    auto_tokenizer: bool = False
    ceiling: bool = True
    ceiling_size: int = 8192
    ceiling_iters: int = 10
    attn_backends: List[str] = field(default_factory=list)
    attn_batch_size: int = -1
    attn_iters: int = 20
    attn_warmup: int = 5
    attn_check_rows: int = 1
    loss_kernels: List[str] = field(default_factory=list)
    loss_batch_size: int = -1
    loss_iters: int = 20
    loss_warmup: int = 5
    profile_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in ("train", "attention", "loss"):
            raise ConfigError("task", f"must be 'train', 'attention' or 'loss', got {self.task!r}")
        if self.tokens not in ("synthetic", "data"):
            raise ConfigError(
                "tokens", f"must be 'synthetic' (random ids) or 'data' (the data group's shards), got {self.tokens!r}"
            )
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                "warmup_steps", f"must be in [0, steps={self.steps}) so that a step is timed, got {self.warmup_steps}"
            )
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise ConfigError("total_batch_size", f"must be -1 (auto) or >= 1, got {self.total_batch_size}")
        for key in ("ceiling_size", "ceiling_iters", "attn_iters", "loss_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("attn_warmup", "attn_check_rows", "loss_warmup", "profile_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("attn_batch_size", "loss_batch_size"):
            if getattr(self, key) != -1 and getattr(self, key) < 1:
                raise ConfigError(key, f"must be -1 (hardware.device_batch_size) or >= 1, got {getattr(self, key)}")
        bad = [b for b in self.attn_backends if b not in ("fa4", "flex", "sdpa")]
        if bad:
            raise ConfigError("attn_backends", f"unknown backend(s) {bad}; valid: fa4, flex, sdpa (empty = all)")
        bad = [k for k in self.loss_kernels if k not in LOSS_BENCH_KERNELS]
        if bad:
            raise ConfigError(
                "loss_kernels", f"unknown loss kernel(s) {bad}; valid: {', '.join(LOSS_BENCH_KERNELS)} (empty = all)"
            )


# Which schema backs which group. `chatlm.app` registers these in Hydra's ConfigStore and the
# config tests check that every YAML file of a group validates against its schema.
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "hardware": HardwareConfig,
    "precision": PrecisionConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
    "cluster": ClusterInfo,
    "experiment": ExperimentInfo,
    "sweep": SweepInfo,
    "debug": DebugInfo,
}

# The root schema of each stage's primary config (conf/<stage>.yaml).
STAGE_SCHEMAS: dict[str, type] = {
    "check": CheckConfig,
    "tokenize": TokenizeConfig,
    "train": TrainConfig,
    "bench": BenchConfig,
}


def schema_fields(cls: type) -> list[str]:
    """Field names of a schema dataclass (used for 'did you mean' suggestions)."""
    return list(getattr(cls, "__dataclass_fields__", {}))


def as_plain(obj: Any) -> Any:
    """A dataclass/enum tree as JSON-ready builtins."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "__dataclass_fields__"):
        return {k: as_plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_plain(v) for k, v in obj.items()}
    return obj
