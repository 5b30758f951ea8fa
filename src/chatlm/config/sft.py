"""Schemas of the SFT stage (`conf/sft.yaml`) and its conversation mixtures (`conf/mixture/`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from chatlm.config.fields import setting
from chatlm.config.stages import LoopConfig, OptimizerStageConfig, _at_least
from chatlm.errors import ConfigError

#: what a mixture source can be (chatlm.data.chat.sources builds each)
GENERATED_KINDS = ("identity", "spelling", "arithmetic")
#: files `chatlm fetch sft` writes as <mixture.data_dir>/<kind>.jsonl (the last three need internet)
FETCHED_KINDS = (
    "chatterbot",
    "chitchat",
    "mc_practice",
    "natural_instructions",
    "smoltalk",
    "mmlu_aux_train",
    "gsm8k_train",
)
CHAT_SOURCE_KINDS = (*GENERATED_KINDS, *FETCHED_KINDS, "jsonl")
OVERLONG = ("truncate", "drop")


@dataclass
class ChatSourceConfig:
    """One source of conversations in a mixture: what it is, how many, and how often it repeats."""

    kind: str = setting(
        "jsonl",
        "identity | spelling | arithmetic (generated here) | chatterbot | chitchat | mc_practice | "
        "natural_instructions | smoltalk | mmlu_aux_train | gsm8k_train (chatlm fetch sft) | "
        "jsonl (a file of conversations, one JSON object per line)",
    )
    path: Optional[str] = setting(
        None,
        "jsonl: the file; identity: a YAML of the model's name, maker and answers (null = the packaged one); "
        "fetched kinds: the file (null = <mixture.data_dir>/<kind>.jsonl)",
    )
    epochs: float = setting(1.0, "how often the source's training conversations appear per pass (> 0; 0.5 = half)")
    size: int = setting(1000, "generated sources: conversations generated")
    max_examples: int = setting(-1, "file sources: keep only the first N conversations (-1 = all)")
    seed: int = setting(0, "generated sources: the generator's seed (added to the mixture seed)")

    def check(self, key: str) -> None:
        if self.kind not in CHAT_SOURCE_KINDS:
            raise ConfigError(f"{key}.kind", f"must be one of {', '.join(CHAT_SOURCE_KINDS)}, got {self.kind!r}")
        if not self.epochs > 0:
            raise ConfigError(f"{key}.epochs", f"must be > 0 (drop the source to leave it out), got {self.epochs}")
        _at_least(self.size, 1, f"{key}.size")
        if self.max_examples == 0 or self.max_examples < -1:
            raise ConfigError(f"{key}.max_examples", f"must be -1 (all) or >= 1, got {self.max_examples}")
        if self.kind == "jsonl" and not self.path:
            raise ConfigError(f"{key}.path", "a jsonl source needs the file: path=<conversations.jsonl>")


@dataclass
class MixtureConfig:
    """Set by `mixture=<name>` (conf/mixture/): weighted conversation sources, a held-out
    validation slice, and what happens to conversations longer than the rows."""

    name: str = setting("offline", "mixture name, recorded with the run")
    sources: Dict[str, ChatSourceConfig] = setting(
        help="name -> source; names label the sizes report (add sources in a mixture YAML of your own, "
        "e.g. conf/local or --config-dir; remove one with ~mixture.sources.NAME)",
        factory=dict,
    )
    seed: int = setting(42, "shuffles the mixture and seeds the generated sources (nanochat: 42)")
    val_fraction: float = setting(0.02, "fraction of each source's distinct conversations held out for validation")
    max_val: int = setting(500, "held-out conversations per source at most")
    overlong: str = setting(
        "truncate",
        "conversations longer than a row: truncate (at the last turn boundary that fits) | drop; both are counted",
    )
    data_dir: str = setting(
        "${paths.cache_dir}/sft", "where `chatlm fetch sft` writes the package sources", results=False
    )

    def __post_init__(self) -> None:
        # an empty mixture is refused by the stage (SFTConfig): the schema's default has no sources
        for name, source in self.sources.items():
            source.check(f"mixture.sources.{name}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("mixture.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _at_least(self.max_val, 0, "mixture.max_val")
        if self.overlong not in OVERLONG:
            raise ConfigError("mixture.overlong", f"must be one of {', '.join(OVERLONG)}, got {self.overlong!r}")


@dataclass
class SFTConfig(OptimizerStageConfig, LoopConfig):
    """`python -m chatlm.sft`: supervised fine-tuning of a pretrained checkpoint on conversations
    (nanochat's chat_sft). The model, its tokenizer and its sequence length come from `init_from`."""

    stage: str = setting("sft", "stage name")
    init_from: str = setting("", "the model to fine-tune: a run directory (its checkpoints/latest) or a checkpoint")
    tokenizer_dir: Optional[str] = setting(None, "the tokenizer, for checkpoints that do not carry one")
    mixture: MixtureConfig = setting(help="the conversations trained on (conf/mixture/)", factory=MixtureConfig)
    steps: int = setting(-1, "optimizer steps; -1 = one pass over the mixture (nanochat)")
    total_batch_size: int = setting(-1, "tokens per optimizer step; -1 = the base run's (nanochat)")
    init_lr_frac: float = setting(
        0.8, "every learning rate starts at this fraction of the optim group's (nanochat: 0.8)"
    )
    load_optimizer: bool = setting(
        True, "start from the base run's optimizer state when it matches (nanochat), with fresh learning rates"
    )
    buffer_size: int = setting(100, "conversations the best-fit packer chooses among (nanochat: 100)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_loop()
        if not self.mixture.sources:
            raise ConfigError("mixture.sources", "the mixture is empty: name at least one source (conf/mixture/)")
        if not str(self.init_from).strip():
            raise ConfigError("init_from", "say which model to fine-tune: init_from=<run dir | checkpoint dir>")
        if self.steps == 0 or self.steps < -1:
            raise ConfigError("steps", f"must be -1 (one pass over the mixture) or >= 1, got {self.steps}")
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise ConfigError("total_batch_size", f"must be -1 (the base run's) or >= 1, got {self.total_batch_size}")
        if not 0 < self.init_lr_frac <= 1:
            raise ConfigError("init_lr_frac", f"must be in (0, 1], got {self.init_lr_frac}")
        _at_least(self.buffer_size, 1, "buffer_size")
