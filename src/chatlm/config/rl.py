"""Schemas of the RL stage (`conf/rl.yaml`), its `rl.*` keys and its tasks (`conf/rl_task/`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from chatlm.config.fields import setting
from chatlm.config.stages import LoopConfig, OptimizerStageConfig, _at_least
from chatlm.errors import ConfigError

#: what an RL task can be (chatlm.rollouts.tasks builds each)
RL_TASK_KINDS = ("gsm8k", "arithmetic", "countdown", "spelling", "jsonl")


@dataclass
class RLTaskConfig:
    """Set by `rl_task=<name>` (conf/rl_task/): the problems rewarded and the slice pass@k is measured on.

    Built by `chatlm.rollouts.tasks.build_task`; rewards are exact (the number after '####', or
    the countdown expression)."""

    name: str = setting("arithmetic", "task name, recorded with the run")
    kind: str = setting(
        "arithmetic",
        "gsm8k (GSM8K train from `chatlm fetch sft --sources gsm8k_train`, scored on GSM8K test) | arithmetic "
        "(word problems, calculator allowed) | countdown (reach a target from given numbers) | spelling (count a "
        "letter in a word, scored on SpellingBee) | jsonl (your own {question, answer} file)",
    )
    path: Optional[str] = setting(
        None, "gsm8k and jsonl: the training problems, one {question, answer ending '#### N'} per line"
    )
    eval_path: Optional[str] = setting(
        None, "jsonl: the problems pass@k is measured on (null = hold out eval_size problems of path)"
    )
    size: int = setting(8000, "generated kinds: training problems generated")
    eval_size: int = setting(500, "generated kinds: evaluation problems generated (none shared with training)")
    seed: int = setting(
        1000,
        "generated kinds: seed of the training problems (evaluation: seed + 1); SFT's generated sources use "
        "mixture.seed (42) + their own small seeds, so the problems differ from SFT's",
    )
    max_examples: int = setting(-1, "gsm8k and jsonl: keep only the first N training problems (-1 = all)")
    numbers: int = setting(4, "countdown: numbers given per problem (2..6)")

    def __post_init__(self) -> None:
        if self.kind not in RL_TASK_KINDS:
            raise ConfigError("rl_task.kind", f"must be one of {', '.join(RL_TASK_KINDS)}, got {self.kind!r}")
        _at_least(self.size, 1, "rl_task.size")
        _at_least(self.eval_size, 0, "rl_task.eval_size")
        if self.max_examples == 0 or self.max_examples < -1:
            raise ConfigError("rl_task.max_examples", f"must be -1 (all) or >= 1, got {self.max_examples}")
        if not 2 <= self.numbers <= 6:
            raise ConfigError("rl_task.numbers", f"must be in 2..6, got {self.numbers}")
        if self.kind in ("gsm8k", "jsonl") and not self.path:
            raise ConfigError("rl_task.path", f"a {self.kind} task needs its training file: rl_task.path=<file.jsonl>")


@dataclass
class RLSettings:
    """The `rl.*` keys of conf/rl.yaml (sampling, rewards and the pass@k evaluation; not a group)."""

    num_samples: int = setting(16, "completions sampled per prompt; the advantage compares them (nanochat: 16)")
    examples_per_step: int = setting(16, "prompts per optimizer step, all ranks together (nanochat: 16)")
    device_batch_size: int = setting(
        64,
        "sequences each rank samples at once (the engine's KV-cache slots; nanochat samples 8 at a time); "
        "training micro-batches have hardware.device_batch_size rows",
        results=False,
    )
    max_new_tokens: int = setting(256, "tokens sampled per completion at most, tool outputs included (nanochat: 256)")
    temperature: float = setting(1.0, "sampling temperature, for training and for pass@k (nanochat: 1.0)")
    top_k: int = setting(50, "sample among the k most likely tokens; 0 = all (nanochat: 50)")
    tools: bool = setting(True, "run the calculator when a completion calls it; its output counts as the model's")
    format_reward: float = setting(
        0.0, "reward of a well-formed but wrong answer ('#### <answer>' present), in [0, 1); 0 = nanochat's 0/1 reward"
    )
    pass_k: int = setting(8, "samples per evaluation problem; pass@1..pass@k are logged (nanochat: 8)")
    eval_examples: int = setting(
        400, "evaluation problems: the first N of the task's eval slice; 0 = no pass@k (nanochat: 400)"
    )

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ConfigError(
                "rl.num_samples",
                f"must be >= 2, got {self.num_samples}: the advantage is a sample's reward minus the mean of its "
                "prompt's samples, so with one sample every advantage is 0 and nothing is learned",
            )
        for key in ("examples_per_step", "device_batch_size", "max_new_tokens", "pass_k"):
            _at_least(getattr(self, key), 1, f"rl.{key}")
        _at_least(self.eval_examples, 0, "rl.eval_examples")
        if not self.temperature > 0:
            raise ConfigError(
                "rl.temperature", f"must be > 0 (the samples of a prompt must differ), got {self.temperature}"
            )
        _at_least(self.top_k, 0, "rl.top_k")
        if not 0.0 <= self.format_reward < 1.0:
            raise ConfigError(
                "rl.format_reward", f"must be in [0, 1) (a right answer earns 1), got {self.format_reward}"
            )


@dataclass
class RLConfig(OptimizerStageConfig, LoopConfig):
    """`python -m chatlm.rl`: on-policy policy gradient on verifiable rewards (nanochat's chat_rl).

    The model, its tokenizer and its sequence length come from `init_from` (an SFT run)."""

    stage: str = setting("rl", "stage name")
    init_from: str = setting("", "the model trained: an SFT run directory (its checkpoints/latest) or a checkpoint")
    tokenizer_dir: Optional[str] = setting(None, "the tokenizer, for checkpoints that do not carry one")
    rl_task: RLTaskConfig = setting(help="the problems and their rewards (conf/rl_task/)", factory=RLTaskConfig)
    rl: RLSettings = setting(help="sampling, rewards and pass@k (the rl.* keys)", factory=RLSettings)
    steps: int = setting(-1, "optimizer steps; -1 = one pass over the task's training problems (nanochat)")
    init_lr_frac: float = setting(
        0.05, "every learning rate starts at this fraction of the optim group's (nanochat: 0.05)"
    )
    eval_every: int = setting(
        60, "pass@k on the eval slice every N steps, at step 0 and at the end; -1 = only at the end (nanochat: 60)"
    )
    eval_tokens: int = setting(80 * 524288, "unused: RL has no validation bpb (pass@k instead)")
    sample_every: int = setting(
        60, "a few rollouts of the last step (prompt, completions, rewards) into samples/ every N steps; -1 = off"
    )
    save_every: int = setting(60, "checkpoint every N steps and at the end; -1 = only at the end (nanochat: 60)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_loop()
        if not str(self.init_from).strip():
            raise ConfigError("init_from", "say which model to train: init_from=<sft run dir | checkpoint dir>")
        if self.steps == 0 or self.steps < -1:
            raise ConfigError("steps", f"must be -1 (one pass over the problems) or >= 1, got {self.steps}")
        if not 0 < self.init_lr_frac <= 1:
            raise ConfigError("init_lr_frac", f"must be in (0, 1], got {self.init_lr_frac}")
        if self.eval_every == 0 or self.eval_every < -1:
            raise ConfigError("eval_every", f"must be -1 (only at the end) or >= 1, got {self.eval_every}")
