"""The root schema of every stage (`conf/<stage>.yaml`).

The stage contract: `StageConfig` holds what every stage has (run name, seed, resume, paths,
hardware, precision, logger, cluster); each stage adds only what it uses. `OptimizerStageConfig`
adds the optimizer and schedule of stages that take optimizer steps; `ModelStageConfig` adds the
model, data and tokenizer of stages that build a fresh model (pretraining and its benchmark).
Evaluation has no optimizer and no data mixture: it reads its model from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from chatlm.config.data import DataConfig, TokenizerConfig
from chatlm.config.fields import setting
from chatlm.config.model import ModelConfig
from chatlm.config.optim import OptimConfig, ScheduleConfig
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
from chatlm.errors import ConfigError

#: loss kernels `python -m chatlm.bench task=loss` can time (chatlm.bench.loss_bench)
LOSS_BENCH_KERNELS = ("plain", "fused", "fused_logits")

#: what `python -m chatlm.bench task=...` measures
BENCH_TASKS = ("train", "attention", "loss", "inference")
INFER_MODES = ("graphs", "eager", "compiled")


def _at_least(value: int, low: int, key: str, what: str = "") -> None:
    if value < low:
        raise ConfigError(key, f"must be >= {low}{what}, got {value}")


@dataclass
class StageConfig:
    """Keys every stage has."""

    stage: str = setting("stage", "stage name: the first directory level under paths.output_root")
    run_name: str = setting("run", "last part of the run directory name; shown in comparisons")
    seed: int = setting(42, "seeds Python, NumPy and torch on every rank (the same init everywhere)")
    resume: str = setting(
        "auto",
        "auto: continue this run directory if its config matches | never | a checkpoint to start a new run from",
        results=False,
    )
    tags: List[str] = setting(help="free-form labels recorded in run.json", factory=list, results=False)
    paths: PathsConfig = setting(
        help="where outputs, caches, data and tokenizers live", factory=PathsConfig, results=False
    )
    hardware: HardwareConfig = setting(
        help="device, ranks per node, per-rank batch, compile", factory=HardwareConfig, results=False
    )
    precision: PrecisionConfig = setting(help="compute dtype and fp8", factory=PrecisionConfig)
    logger: LoggerConfig = setting(
        help="extra metric sinks (metrics.jsonl is always written)", factory=LoggerConfig, results=False
    )
    cluster: ClusterInfo = setting(help="which launcher preset ran", factory=ClusterInfo, results=False)

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise ConfigError("run_name", f"must be a non-empty name without '/', got {self.run_name!r}")
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ConfigError("resume", "must be 'auto', 'never' or a checkpoint path")


@dataclass
class CheckConfig(StageConfig):
    """`python -m chatlm.check`: exercise the launch path (ranks, devices, run directory)."""

    stage: str = setting("check", "stage name")
    matmul_size: int = setting(256, "side of the square matrices timed on the device")
    matmul_iters: int = setting(10, "timed matmuls (after one warm-up)")
    sleep_s: float = setting(0.0, "sleep this long before finishing (to test timeouts and preemption)")
    fail: bool = setting(False, "raise an error on purpose (to test failure records and sweep summaries)")


@dataclass
class TokenizeConfig(StageConfig):
    """`python -m chatlm.tokenize`: train the BPE tokenizer on the configured data."""

    stage: str = setting("tokenize", "stage name")
    tokenizer: TokenizerConfig = setting(help="the tokenizer to train", factory=TokenizerConfig)
    data: DataConfig = setting(help="the text it is trained on (train shards only)", factory=DataConfig)
    eval_docs: int = setting(200, "held-out validation documents per source for the compression report")
    overwrite: bool = setting(False, "replace an existing tokenizer of the same name (else refuse)")
    reuse: bool = setting(
        False, "keep an existing tokenizer of the same name and only report it (pipelines re-run safely)", results=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self.eval_docs, 1, "eval_docs")


@dataclass
class OptimizerStageConfig(StageConfig):
    """Stages that take optimizer steps: an optimizer and a learning-rate schedule."""

    optim: OptimConfig = setting(help="optimizer and its learning rates", factory=OptimConfig)
    schedule: ScheduleConfig = setting(help="learning-rate multiplier over the run", factory=ScheduleConfig)


@dataclass
class ModelStageConfig(OptimizerStageConfig):
    """Stages that build a fresh model from a config: model, data and tokenizer, and the preset groups."""

    model: ModelConfig = setting(help="the GPT architecture", factory=ModelConfig)
    data: DataConfig = setting(help="pretraining shard sets", factory=DataConfig)
    tokenizer: TokenizerConfig = setting(help="which BPE tokenizer to train or use", factory=TokenizerConfig)
    experiment: ExperimentInfo = setting(help="which experiment preset ran", factory=ExperimentInfo)
    sweep: SweepInfo = setting(help="which named sweep ran", factory=SweepInfo)
    debug: DebugInfo = setting(help="which debug preset ran", factory=DebugInfo)


#: what `python -m chatlm.eval eval.tasks=[...]` can score (chatlm.evals.tasks describes each)
EVAL_TASKS = ("bpb", "core", "arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling_bee")


@dataclass
class EvalSuiteConfig:
    """Set by `eval=<suite>` (conf/eval/): which tasks are scored, on how many examples, and how
    the generative ones sample. Task data comes from `chatlm fetch evals` (or a DCLM eval bundle)."""

    name: str = setting("bpb", "suite name, recorded with the results")
    tasks: List[str] = setting(help=f"tasks scored, in order: {', '.join(EVAL_TASKS)}", factory=lambda: ["bpb"])
    core_tasks: List[str] = setting(
        help="CORE: only these task labels of the bundle (empty = all of them)", factory=list
    )
    max_examples: int = setting(-1, "per task: score the first N examples of its fixed shuffle (-1 = all)")
    batch_size: int = setting(32, "rows (one prompt, or one choice of a prompt) per forward pass", results=False)
    max_batch_tokens: int = setting(
        -1,
        "a forward pass holds at most this many tokens (rows x padded length); -1 = 16384 on a GPU, "
        "2048 on a CPU (where larger batches only add cache misses; docs/performance.md)",
        results=False,
    )
    data_dir: str = setting("${paths.cache_dir}/evals", "where `chatlm fetch evals` put the task files", results=False)
    core_bundle: Optional[str] = setting(
        None,
        "CORE: a DCLM eval bundle directory (core.yaml, eval_data/, eval_meta_data.csv); null = <data_dir>/core",
        results=False,
    )
    max_new_tokens: int = setting(512, "generative tasks: tokens sampled per answer at most")
    temperature: float = setting(0.0, "generative tasks: sampling temperature (0 = greedy)")
    top_k: int = setting(50, "generative tasks: sample from the k most likely tokens (0 = all)")
    num_samples: int = setting(1, "generative tasks: answers per problem; pass@k for k = 1..num_samples")
    sandbox_timeout_s: float = setting(5.0, "humaneval: wall-clock seconds per program in the sandbox")
    sandbox_workers: int = setting(4, "humaneval: programs run at once", results=False)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in EVAL_TASKS]
        if bad:
            raise ConfigError("eval.tasks", f"unknown task(s) {bad}; valid: {', '.join(EVAL_TASKS)}")
        if not self.tasks:
            raise ConfigError("eval.tasks", "name at least one task, e.g. eval=core or eval.tasks=[bpb,core]")
        if self.max_examples == 0 or self.max_examples < -1:
            raise ConfigError("eval.max_examples", f"must be -1 (all) or >= 1, got {self.max_examples}")
        for key in ("batch_size", "max_new_tokens", "num_samples", "sandbox_workers"):
            _at_least(getattr(self, key), 1, f"eval.{key}")
        if self.max_batch_tokens == 0 or self.max_batch_tokens < -1:
            raise ConfigError("eval.max_batch_tokens", f"must be -1 (auto) or >= 1, got {self.max_batch_tokens}")
        if self.temperature < 0:
            raise ConfigError("eval.temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("eval.top_k", f"must be >= 0 (0 = all tokens), got {self.top_k}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError("eval.num_samples", "several samples need eval.temperature > 0 (greedy gives one answer)")
        if self.sandbox_timeout_s <= 0:
            raise ConfigError("eval.sandbox_timeout_s", f"must be > 0, got {self.sandbox_timeout_s}")


@dataclass
class LoopConfig:
    """The training loop's cadences, shared by the stages that run `Trainer.fit` (train, sft): logs,
    validation, in-training evals, samples, checkpoints, profiling and the preemption drill."""

    log_every: int = setting(1, "write a metrics.jsonl line every N steps")
    eval_every: int = setting(250, "validation bits-per-byte every N steps, at step 0 and at the end (nanochat: 250)")
    eval_tokens: int = setting(
        80 * 524288,
        "validation tokens per bpb evaluation, all ranks together (nanochat: "
        "80 x 2^19); a smaller val split is evaluated whole",
    )
    chat_metric_every: int = setting(
        -1, "chat evals (chat_eval.tasks) every N steps and at the end; -1 = off (for chat models: SFT, RL)"
    )
    chat_eval: EvalSuiteConfig = setting(
        help="the chat evals run in training: tasks, examples per task, sampling (the eval stage's eval.* keys)",
        factory=lambda: EvalSuiteConfig(
            name="in_training", tasks=["arc_easy", "arc_challenge", "mmlu"], max_examples=500
        ),
    )
    sample_every: int = setting(2000, "greedy samples of 7 fixed prompts every N steps and at the end; -1 = off")
    save_every: int = setting(-1, "checkpoint every N steps; -1 = only at the end")
    keep_checkpoints: int = setting(-1, "keep only the newest N checkpoints; -1 keeps all")
    stop_at_step: int = setting(
        -1, "act as if preempted after this step (checkpoint, status preempted): resume drills", results=False
    )
    profile_steps: int = setting(0, ">0: torch.profiler trace of this many steps into <run dir>/profile/")
    profile_start: int = setting(5, "steps before profiling starts (skips warm-up and compilation)")

    def check_loop(self) -> None:
        for key in ("profile_steps", "profile_start"):
            _at_least(getattr(self, key), 0, key)
        _at_least(self.log_every, 1, "log_every")
        _at_least(self.eval_tokens, 1, "eval_tokens")
        if self.chat_metric_every == 0 or self.chat_metric_every < -1:
            raise ConfigError("chat_metric_every", f"must be -1 (off) or >= 1, got {self.chat_metric_every}")
        bad = [t for t in self.chat_eval.tasks if t in ("bpb", "core")]
        if bad:
            raise ConfigError(
                "chat_eval.tasks", f"{bad} are not chat tasks (training has eval_every and core_metric_every for them)"
            )


@dataclass
class TrainConfig(ModelStageConfig, LoopConfig):
    """`python -m chatlm.train`: pretraining (nanochat's base_train)."""

    stage: str = setting("train", "stage name")
    steps: int = setting(-1, "optimizer steps; -1 derives the horizon from target_flops or target_param_data_ratio")
    target_flops: float = setting(-1.0, "training FLOPs budget (used when steps = -1 and this is > 0)")
    target_param_data_ratio: float = setting(12.0, "tokens per scaling parameter (nanochat: 12; its speedrun: 8)")
    total_batch_size: int = setting(-1, "tokens per optimizer step; -1 picks it from the depth (Power Lines rule)")
    core_metric_every: int = setting(-1, "CORE every N steps and at the end; -1 = off (nanochat: 2000)")
    core_metric_max_per_task: int = setting(500, "examples per CORE task; -1 = all (nanochat: 500)")
    core_bundle: Optional[str] = setting(
        None,
        "CORE tasks: a DCLM eval bundle directory; null = <paths.cache_dir>/evals/core (chatlm fetch evals)",
        results=False,
    )
    init_from: Optional[str] = setting(
        None, "start from this checkpoint's weights (run dir or checkpoint) instead of a fresh init"
    )
    auto_tokenizer: bool = setting(
        False, "train the tokenizer first if it does not exist (else: an error naming chatlm.tokenize)"
    )
    overfit_batches: int = setting(0, ">0: train on the first N micro-batches over and over (debug=overfit)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_loop()
        _at_least(self.overfit_batches, 0, "overfit_batches")
        if self.steps == 0 or self.steps < -1:
            raise ConfigError("steps", f"must be -1 (derive the horizon) or >= 1, got {self.steps}")
        if self.steps == -1 and self.target_flops <= 0 and self.target_param_data_ratio <= 0:
            raise ConfigError("steps", "no horizon: set steps, target_flops or target_param_data_ratio > 0")
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise ConfigError("total_batch_size", f"must be -1 (auto) or >= 1, got {self.total_batch_size}")
        if self.core_metric_every == 0 or self.core_metric_every < -1:
            raise ConfigError("core_metric_every", f"must be -1 (off) or >= 1, got {self.core_metric_every}")
        if self.core_metric_max_per_task == 0 or self.core_metric_max_per_task < -1:
            raise ConfigError(
                "core_metric_max_per_task", f"must be -1 (all) or >= 1, got {self.core_metric_max_per_task}"
            )


@dataclass
class BenchConfig(ModelStageConfig):
    """`python -m chatlm.bench`: throughput/MFU of training steps (task=train), attention kernels
    (task=attention) or the loss head (task=loss), built exactly as training builds them; results go
    to bench.json."""

    stage: str = setting("bench", "stage name")
    hardware: HardwareConfig = setting(
        help="device, per-rank batch, compile: what the benchmark measures", factory=HardwareConfig
    )
    task: str = setting(
        "train",
        "train: timed optimizer steps | attention: fwd+bwd of each attention kernel | "
        "loss: fwd+bwd of lm_head + softcapped CE per loss kernel | inference: the engine's prefill, decode, "
        "time to first token and memory",
    )
    tokens: str = setting(
        "synthetic", "synthetic: random ids (no data or tokenizer needed) | data: the loader on the data group's shards"
    )
    steps: int = setting(30, "optimizer steps run in total (task=train)")
    warmup_steps: int = setting(10, "first steps left out of the statistics (they include torch.compile)")
    total_batch_size: int = setting(-1, "tokens per optimizer step; -1 picks it from the depth as training does")
    auto_tokenizer: bool = setting(False, "with tokens=data: train the tokenizer first if it is missing")
    ceiling: bool = setting(True, "on CUDA, time a ceiling_size^3 bf16 matmul for the measured-ceiling MFU")
    ceiling_size: int = setting(8192, "matrix size of that matmul")
    ceiling_iters: int = setting(10, "timed repetitions of that matmul (median, after 3 warm-ups)")
    attn_backends: List[str] = setting(
        help="task=attention: backends to time (fa4, flex, sdpa); empty = every one this machine can run", factory=list
    )
    attn_batch_size: int = setting(-1, "task=attention: batch B; -1 = hardware.device_batch_size")
    attn_iters: int = setting(20, "task=attention: timed fwd+bwd repetitions per kernel (median)")
    attn_warmup: int = setting(5, "task=attention: untimed repetitions first (compile, autotune)")
    attn_check_rows: int = setting(1, "task=attention: rows compared against an fp32 softmax reference (0 = none)")
    loss_kernels: List[str] = setting(
        help="task=loss: variants to time (plain, fused, fused_logits); empty = all", factory=list
    )
    loss_batch_size: int = setting(-1, "task=loss: sequences per call; -1 = hardware.device_batch_size")
    loss_iters: int = setting(20, "task=loss: timed fwd+bwd repetitions per variant (median)")
    loss_warmup: int = setting(5, "task=loss: untimed repetitions first (compile, autotune)")
    profile_steps: int = setting(0, "task=train: this many more steps under torch.profiler after the timed ones")
    ckpt: str = setting(
        "", "task=inference: a checkpoint (run dir or step dir) to time; empty = the model group at init"
    )
    infer_batch_sizes: List[int] = setting(
        help="task=inference: sequences decoded together, one measurement each", factory=lambda: [1, 8, 32]
    )
    infer_prompt_tokens: int = setting(512, "task=inference: prompt length (cut to the context minus new tokens)")
    infer_new_tokens: int = setting(256, "task=inference: tokens generated per sequence (greedy, no stop token)")
    infer_modes: List[str] = setting(
        help="task=inference: graphs (CUDA-graph decode steps; CUDA only), compiled (graphs of an "
        "Inductor-compiled step; CUDA only) and/or eager",
        factory=lambda: ["graphs", "eager"],
    )
    infer_profile: bool = setting(True, "task=inference: profile a few decode steps per mode at the largest batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in BENCH_TASKS:
            raise ConfigError("task", f"must be one of {', '.join(BENCH_TASKS)}, got {self.task!r}")
        if self.tokens not in ("synthetic", "data"):
            raise ConfigError(
                "tokens", f"must be 'synthetic' (random ids) or 'data' (the data group's shards), got {self.tokens!r}"
            )
        _at_least(self.steps, 1, "steps")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                "warmup_steps", f"must be in [0, steps={self.steps}) so that a step is timed, got {self.warmup_steps}"
            )
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise ConfigError("total_batch_size", f"must be -1 (auto) or >= 1, got {self.total_batch_size}")
        for key in ("ceiling_size", "ceiling_iters", "attn_iters", "loss_iters"):
            _at_least(getattr(self, key), 1, key)
        for key in ("attn_warmup", "attn_check_rows", "loss_warmup", "profile_steps"):
            _at_least(getattr(self, key), 0, key)
        for key in ("attn_batch_size", "loss_batch_size"):
            if getattr(self, key) != -1 and getattr(self, key) < 1:
                raise ConfigError(key, f"must be -1 (hardware.device_batch_size) or >= 1, got {getattr(self, key)}")
        _at_least(self.infer_prompt_tokens, 1, "infer_prompt_tokens")
        _at_least(self.infer_new_tokens, 1, "infer_new_tokens")
        if not self.infer_batch_sizes or min(self.infer_batch_sizes) < 1:
            raise ConfigError(
                "infer_batch_sizes", f"must be a non-empty list of sizes >= 1, got {self.infer_batch_sizes}"
            )
        bad = [m for m in self.infer_modes if m not in INFER_MODES]
        if bad or not self.infer_modes:
            raise ConfigError(
                "infer_modes", f"must be a non-empty list of {', '.join(INFER_MODES)}, got {self.infer_modes}"
            )
        bad = [b for b in self.attn_backends if b not in ("fa4", "flex", "sdpa")]
        if bad:
            raise ConfigError("attn_backends", f"unknown backend(s) {bad}; valid: fa4, flex, sdpa (empty = all)")
        bad = [k for k in self.loss_kernels if k not in LOSS_BENCH_KERNELS]
        if bad:
            raise ConfigError(
                "loss_kernels", f"unknown loss kernel(s) {bad}; valid: {', '.join(LOSS_BENCH_KERNELS)} (empty = all)"
            )


@dataclass
class EvalConfig(StageConfig):
    """`python -m chatlm.eval`: score a checkpoint. No optimizer, no training data: the model, its
    tokenizer and its step come from the checkpoint (`chatlm.runtime.model_loading.load_model`)."""

    stage: str = setting("eval", "stage name")
    ckpt: str = setting(
        "",
        "what to evaluate: a run directory (its checkpoints/latest), a checkpoint directory "
        "or a converted nanochat checkpoint",
    )
    tokenizer_dir: Optional[str] = setting(
        None,
        "the tokenizer directory, for checkpoints that do not carry one "
        "(converted nanochat checkpoints); checked against the checkpoint",
    )
    eval: EvalSuiteConfig = setting(help="the tasks scored and how (conf/eval/)", factory=EvalSuiteConfig)
    data: DataConfig = setting(help="bpb: the shard sets whose validation shards are scored", factory=DataConfig)
    eval_tokens: int = setting(
        80 * 524288, "bpb: validation tokens scored, all ranks together; a smaller val split is scored whole"
    )
    copy_to_run: bool = setting(True, "also write the results into the evaluated run's evals/step_<N>/")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.ckpt).strip():
            raise ConfigError(
                "ckpt", "say what to evaluate: ckpt=<run dir | checkpoint dir>, e.g. ckpt=outputs/train/latest"
            )
        _at_least(self.eval_tokens, 1, "eval_tokens")


CHAT_MODES = ("auto", "chat", "complete")


@dataclass
class ChatConfig:
    """`python -m chatlm.chat`: talk to a checkpoint in the terminal (or answer one prompt). No run
    directory: nothing is trained or scored."""

    stage: str = setting("chat", "stage name")
    ckpt: str = setting("", "the model: a run directory (its checkpoints/latest) or a checkpoint directory")
    tokenizer_dir: Optional[str] = setting(None, "the tokenizer, for checkpoints that do not carry one")
    prompt: str = setting("", 'answer this one prompt and exit (also -p "..."); empty = interactive')
    mode: str = setting(
        "auto",
        "chat: the chat template (SFT/RL checkpoints) | complete: continue plain text (base models) | "
        "auto: chat for sft/rl checkpoints, complete otherwise",
    )
    system: str = setting("", "a system prompt, folded into the first user message (chat mode)")
    temperature: float = setting(0.6, "sampling temperature; 0 = greedy")
    top_k: int = setting(50, "sample among the k most likely tokens; 0 = no limit")
    top_p: float = setting(1.0, "nucleus sampling: the smallest set of tokens with this much probability; 1 = off")
    max_tokens: int = setting(256, "new tokens per answer at most")
    seed: Optional[int] = setting(None, "sampling seed of the first answer (later answers add 1 each); null = random")
    device: str = setting("auto", "auto (CUDA if available, else CPU) | cpu | cuda | cuda:N")
    dtype: str = setting("auto", "compute dtype: auto (bf16 on recent GPUs, fp32 on CPU) | float32 | bfloat16")
    tools: bool = setting(True, "run the calculator when the model calls it (<|python_start|> ... <|python_end|>)")
    tool_executor: str = setting(
        "calculator", "calculator: restricted arithmetic in-process | sandbox: Python in a sandbox"
    )
    cuda_graphs: Optional[bool] = setting(None, "decode steps as CUDA graphs; null = on for CUDA")

    def __post_init__(self) -> None:
        if not str(self.ckpt).strip():
            raise ConfigError("ckpt", "say which model to talk to: ckpt=<run dir | checkpoint dir>")
        if self.mode not in CHAT_MODES:
            raise ConfigError("mode", f"must be one of {', '.join(CHAT_MODES)}, got {self.mode!r}")
        if not self.temperature >= 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        _at_least(self.top_k, 0, "top_k")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        _at_least(self.max_tokens, 1, "max_tokens")
        if self.tool_executor not in ("calculator", "sandbox"):
            raise ConfigError("tool_executor", f"must be calculator or sandbox, got {self.tool_executor!r}")
