"""Typed configuration schemas for every chatlm stage and config group.

Plain dataclasses, one module per concern: `model`, `optim` (optimizer and schedule), `data` (shard
sets and tokenizer), `runtime` (hardware, precision, logger, paths, presets) and `stages` (the
root schema of each stage). The library imports them freely and never needs Hydra; the Hydra edge
(`chatlm.hydra`) registers them in Hydra's ConfigStore, so every YAML file in `conf/` is merged
into a typed node: a typo in a key, a value of the wrong type or an unknown enum value fails at
composition time with the key's full name, and `__post_init__` refuses values that make no sense.

Every field is declared with `setting(default, "one-line description", results=..., ...)`
(`chatlm.config.fields`); `chatlm.config.keys` derives from those declarations which keys change
results, and `chatlm.config.reference` writes docs/configs.md from the descriptions. Defaults are
nanochat's values. Fields whose default is `None` are derived in code (from the depth, the tokenizer
or the sequence length); the derived values are written under `derived:` in the run directory's
`config.resolved.yaml`.
"""

from chatlm.config.data import (
    NANOCHAT_SPECIAL_TOKENS,
    NANOCHAT_SPLIT_PATTERN,
    DataConfig,
    DataKind,
    DataSourceConfig,
    TokenizerConfig,
)
from chatlm.config.fields import setting
from chatlm.config.model import AttentionBackend, KernelChoice, ModelConfig, QKVMatmul
from chatlm.config.optim import OptimConfig, OptimKind, ScheduleConfig, ScheduleKind
from chatlm.config.registry import GROUP_SCHEMAS, STAGE_SCHEMAS, schema_fields, stage_schema
from chatlm.config.rl import RL_TASK_KINDS, RLConfig, RLSettings, RLTaskConfig
from chatlm.config.runtime import (
    COMPILE_MODES,
    ClusterInfo,
    DebugInfo,
    Device,
    DType,
    ExperimentInfo,
    HardwareConfig,
    LoggerConfig,
    LoggerKind,
    PathsConfig,
    PrecisionConfig,
    SweepInfo,
    WandbMode,
)
from chatlm.config.serve import ServeConfig
from chatlm.config.sft import CHAT_SOURCE_KINDS, ChatSourceConfig, MixtureConfig, SFTConfig
from chatlm.config.stages import (
    BENCH_TASKS,
    EVAL_TASKS,
    LOSS_BENCH_KERNELS,
    BenchConfig,
    ChatConfig,
    CheckConfig,
    EvalConfig,
    EvalSuiteConfig,
    ModelStageConfig,
    OptimizerStageConfig,
    StageConfig,
    TokenizeConfig,
    TrainConfig,
)
from chatlm.errors import ConfigError

__all__ = [
    "CHAT_SOURCE_KINDS",
    "ChatSourceConfig",
    "MixtureConfig",
    "SFTConfig",
    "RL_TASK_KINDS",
    "RLConfig",
    "RLSettings",
    "RLTaskConfig",
    "BENCH_TASKS",
    "COMPILE_MODES",
    "GROUP_SCHEMAS",
    "LOSS_BENCH_KERNELS",
    "NANOCHAT_SPECIAL_TOKENS",
    "NANOCHAT_SPLIT_PATTERN",
    "STAGE_SCHEMAS",
    "AttentionBackend",
    "BenchConfig",
    "CheckConfig",
    "ClusterInfo",
    "ConfigError",
    "DType",
    "DataConfig",
    "DataKind",
    "DataSourceConfig",
    "DebugInfo",
    "Device",
    "EVAL_TASKS",
    "ChatConfig",
    "EvalConfig",
    "EvalSuiteConfig",
    "ExperimentInfo",
    "HardwareConfig",
    "KernelChoice",
    "LoggerConfig",
    "LoggerKind",
    "ModelConfig",
    "ModelStageConfig",
    "OptimConfig",
    "OptimKind",
    "OptimizerStageConfig",
    "PathsConfig",
    "PrecisionConfig",
    "QKVMatmul",
    "ScheduleConfig",
    "ScheduleKind",
    "ServeConfig",
    "StageConfig",
    "SweepInfo",
    "TokenizeConfig",
    "TokenizerConfig",
    "TrainConfig",
    "WandbMode",
    "schema_fields",
    "setting",
    "stage_schema",
]
