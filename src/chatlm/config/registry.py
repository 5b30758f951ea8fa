"""Which schema backs which config group and which stage. The Hydra edge registers these in
Hydra's ConfigStore; the config tests check that every YAML file of a group validates against its
schema."""

from __future__ import annotations

from chatlm.config.data import DataConfig, TokenizerConfig
from chatlm.config.model import ModelConfig
from chatlm.config.optim import OptimConfig, ScheduleConfig
from chatlm.config.rl import RLConfig, RLSettings, RLTaskConfig
from chatlm.config.runtime import (
    ClusterInfo,
    DebugInfo,
    ExperimentInfo,
    HardwareConfig,
    LoggerConfig,
    PathsConfig,
    PrecisionConfig,
    SweepInfo,
)
from chatlm.config.serve import ServeConfig
from chatlm.config.sft import MixtureConfig, SFTConfig
from chatlm.config.stages import (
    BenchConfig,
    ChatConfig,
    CheckConfig,
    EvalConfig,
    EvalSuiteConfig,
    StageConfig,
    TokenizeConfig,
    TrainConfig,
)

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
    "eval": EvalSuiteConfig,
    "mixture": MixtureConfig,
    "rl_task": RLTaskConfig,
    "rl": RLSettings,  # the rl.* keys of conf/rl.yaml: a nested node, not a conf/ directory
}

#: the root schema of each stage's primary config (conf/<stage>.yaml)
STAGE_SCHEMAS: dict[str, type] = {
    "check": CheckConfig,
    "tokenize": TokenizeConfig,
    "train": TrainConfig,
    "bench": BenchConfig,
    "eval": EvalConfig,
    "chat": ChatConfig,
    "serve": ServeConfig,
    "sft": SFTConfig,
    "rl": RLConfig,
}


def stage_schema(stage: object) -> type:
    """The schema of a stage by name; unknown stages (other tools' records) get the base StageConfig."""
    return STAGE_SCHEMAS.get(str(stage), StageConfig)


def schema_fields(cls: type) -> list[str]:
    """Field names of a schema dataclass (used for 'did you mean' suggestions)."""
    return list(getattr(cls, "__dataclass_fields__", {}))
