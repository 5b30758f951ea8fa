"""Rollouts: sampling completions with the engine, scoring them, and the training rows they make.

`Sampler` wraps one `chatlm.engine.Engine` over the model being trained (its live weights: nothing
is cast or fused), kept for the whole run so CUDA graphs are captured once. Every completion is
seeded from (run seed, step, problem, sample) (`seed_for`); the engine's sampling noise is a pure
function of the seed and the token's position, so a step's completions depend only on the weights
and the step: a resumed run samples exactly what the uninterrupted one did, with no sampler state
to save.

A completion's tokens are what the engine produced, sampled and forced (calculator outputs), plus
`<|assistant_end|>` when the model chose to stop: stopping is the model's action, so it is trained
(nanochat drops it). Training rows are prompt + completion; a token is trained when it was sampled
(mask 1), never when it is prompt or forced tool output (mask 0), as nanochat; rows are
right-padded with `<|assistant_end|>` and padding is masked.

`StepRollouts` turns a step into micro-batches: the step's problems (a fixed permutation of the
task's training problems per epoch, `examples_per_step` per step, split over the ranks), each
sampled `num_samples` times, rewarded, advantages taken (`chatlm.rollouts.objective`), rows built.
`RolloutBatches` is what the shared Trainer iterates: it hands out (step, micro-batch) slots and
nothing else, so the rollouts of a step are sampled when its first micro-batch is used, after the
previous optimizer step (on-policy), and a checkpoint's loader state is just the next slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from chatlm.data.shards import DataError
from chatlm.engine.engine import Engine, SamplingParams
from chatlm.engine.tools import ToolTokens
from chatlm.rollouts.objective import MicroBatch, group_advantages
from chatlm.rollouts.problems import Problem


def seed_for(*parts: Any) -> int:
    """A 62-bit sampling seed from any parts (a hash: nearby parts give unrelated seeds)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class Generation:
    tokens: list[int]  # sampled and forced tokens, then <|assistant_end|> if the model stopped
    forced: list[bool]  # per token: a tool output forced by the engine (never trained)
    finish: str  # stop | length | error


def visible_text(tok: Any, tokens: Sequence[int]) -> str:
    """The completion as the user reads it: calculator calls replaced by their (forced) outputs,
    special tokens dropped."""
    start, end = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    kept, in_call = [], False
    for t in tokens:
        if t == start:
            in_call = True
        elif in_call:
            in_call = t != end
        elif not tok.is_special(t):
            kept.append(t)
    return tok.decode(kept)


class Sampler:
    """Completions of many prompts at once from the model's current weights (module docstring)."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        *,
        slots: int,
        max_len: int,
        tools: bool,
        context: Callable[[], ContextManager] = contextlib.nullcontext,
    ):
        self.model, self.tok, self.context = model, tok, context  # context: e.g. fp8 swapped out
        self.stop = tok.encode_special("<|assistant_end|>")
        self.engine = Engine(model, tok, max_batch=slots, max_len=max_len, tools=ToolTokens(tok) if tools else None)

    def generate(self, prompts: Sequence[list[int]], seeds: Sequence[int], params: SamplingParams) -> list[Generation]:
        """One completion per (prompt, seed), in order; stopping at `<|assistant_end|>`."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context():
                return self._generate(prompts, seeds, replace(params, stop_token_ids=(self.stop,)))
        finally:
            self.model.train(was_training)

    def _generate(self, prompts: Sequence[list[int]], seeds: Sequence[int], params: SamplingParams) -> list[Generation]:
        ids = [self.engine.add(p, replace(params, seed=s)) for p, s in zip(prompts, seeds)]
        out = {i: Generation([], [], "") for i in ids}
        for event in self.engine.stream():
            gen = out.get(event.request_id)
            if gen is None:
                continue
            if event.token is not None:
                gen.tokens.append(event.token)
                gen.forced.append(event.forced)
            if event.finish_reason is not None:
                gen.finish = event.finish_reason
                if event.finish_reason == "stop" and event.token is None:  # ended by the stop token itself
                    gen.tokens.append(self.stop)
                    gen.forced.append(False)
        return [out[i] for i in ids]


@dataclass
class Rollout:
    problem: int  # index of the problem among the step's (all ranks)
    prompt: list[int]
    generation: Generation
    text: str  # visible text, as the reward read it
    reward: float
    advantage: float = 0.0


def training_row(rollout: Rollout) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + completion: mask 1 on the sampled completion tokens."""
    gen = rollout.generation
    ids = rollout.prompt + gen.tokens
    mask = [0] * len(rollout.prompt) + [0 if forced else 1 for forced in gen.forced]
    return ids, mask


def micro_batches(
    rollouts: Sequence[Rollout], rows: int, count: int, pad_id: int, device: Any, pad_to: int = 1
) -> list[MicroBatch]:
    """`count` micro-batches of `rows` rollouts each (the last ones may be short or empty: every
    rank takes the same number of micro-steps). Each is scaled so that the Trainer's mean over the
    `count` micro-batches is the token-level mean over all of this rank's trained tokens."""
    pairs = [training_row(r) for r in rollouts]
    total = max(1, sum(sum(m[1:]) for _, m in pairs))
    out = []
    for b in range(count):
        chunk = list(range(b * rows, min((b + 1) * rows, len(pairs))))
        if not chunk:
            chunk_pairs: list[tuple[list[int], list[int]]] = [([pad_id, pad_id], [0, 0])]
            advantages = [0.0]
        else:
            chunk_pairs = [pairs[i] for i in chunk]
            advantages = [rollouts[i].advantage for i in chunk]
        length = max(len(ids) for ids, _ in chunk_pairs)
        length = -(-(length - 1) // pad_to) * pad_to + 1
        ids_t = torch.full((len(chunk_pairs), length), pad_id, dtype=torch.long)
        mask_t = torch.zeros((len(chunk_pairs), length), dtype=torch.bool)
        for r, (ids, mask) in enumerate(chunk_pairs):
            ids_t[r, : len(ids)] = torch.tensor(ids)
            mask_t[r, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        targets = ids_t[:, 1:].clone()
        targets[~mask_t[:, 1:]] = -1
        out.append(
            MicroBatch(
                ids_t[:, :-1].to(device),
                targets.to(device),
                torch.tensor(advantages, dtype=torch.float32, device=device),
                count / total,
            )
        )
    return out


@dataclass
class StepStats:
    """One step's rollouts, summed over all ranks."""

    prompts: int = 0
    completions: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    completion_tokens: int = 0  # generated, tool outputs included
    trained_tokens: int = 0  # completion tokens with a loss (sampled)
    row_tokens: int = 0  # prompt + completion tokens forwarded in training
    truncated: int = 0  # completions cut at max_new_tokens
    flat_groups: int = 0  # prompts whose samples all got the same reward (advantage 0)
    solved_groups: int = 0  # prompts whose samples were all right
    sampling_s: float = 0.0  # the slowest rank's sampling time

    def add(self, other: StepStats) -> None:
        for f in fields(self):
            if f.name != "sampling_s":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.sampling_s = max(self.sampling_s, other.sampling_s)

    def metrics(self, step_s: float) -> dict:
        """Per-step means and rates; `step_s` is the whole step's time (sampling + training)."""
        n = max(1, self.completions)
        mean = self.reward_sum / n
        train_s = max(1e-9, step_s - self.sampling_s)
        return {
            "reward": mean,
            "reward_std": max(0.0, self.reward_sq_sum / n - mean * mean) ** 0.5,
            "completion_len": self.completion_tokens / n,
            "truncated_frac": self.truncated / n,
            "flat_frac": self.flat_groups / max(1, self.prompts),
            "solved_frac": self.solved_groups / max(1, self.prompts),
            "sampling_s": self.sampling_s,
            "train_s": train_s,
            "sampling_tok_per_s": self.completion_tokens / max(1e-9, self.sampling_s),
            "train_tok_per_s": self.row_tokens / train_s,
            "prompts_per_s": self.prompts / max(1e-9, step_s),
        }


class StepRollouts:
    """The rollouts and micro-batches of one step at a time, for this rank (module docstring)."""

    def __init__(
        self,
        task: Any,
        problems: Sequence[Problem],
        prompts: Sequence[list[int]],
        sampler: Sampler,
        settings: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
        rows: int,
        device: Any,
        gather: Callable[[Any], list[Any]],
        pad_to: int = 1,
        synchronize: Callable[[], None] = lambda: None,
    ):
        self.task, self.problems, self.prompts, self.sampler, self.s = task, problems, prompts, sampler, settings
        self.seed, self.rank, self.world_size, self.rows, self.device = seed, rank, world_size, rows, device
        self.gather, self.pad_to, self.synchronize = gather, pad_to, synchronize
        self.per_rank = settings.examples_per_step // world_size
        self.micro_per_step = -(-self.per_rank * settings.num_samples // rows)
        self.pad_id = sampler.stop
        self.step: Optional[int] = None
        self.batches: list[MicroBatch] = []
        self.rollouts: list[Rollout] = []
        self.stats = StepStats()
        self._orders: dict[int, list[int]] = {}
        self.on_collect: Callable[[StepStats], None] = lambda stats: None

    def sample_lines(self, prompts: int = 2, per_prompt: int = 4) -> list[str]:
        """The first prompts of the last step, a few completions each with its reward (samples/)."""
        tok, lines = self.sampler.tok, []
        for j in sorted({r.problem for r in self.rollouts})[:prompts]:
            group = [r for r in self.rollouts if r.problem == j]
            lines.append(f"prompt: {tok.decode(group[0].prompt)!r}")
            lines += [f"  reward {r.reward:.2f}: {tok.decode(r.generation.tokens)!r}" for r in group[:per_prompt]]
        return lines

    def problem_index(self, k: int) -> int:
        """The k-th problem of the run: each epoch is a fixed permutation of the training problems."""
        epoch, pos = divmod(k, len(self.problems))
        if epoch not in self._orders:
            order = list(range(len(self.problems)))
            random.Random(f"{self.seed}:rl-order:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is enough
        return self._orders[epoch][pos]

    def params(self) -> SamplingParams:
        s = self.s
        return SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k)

    def micro_batch(self, step: int, index: int) -> MicroBatch:
        if step != self.step:
            self.collect(step)
        return self.batches[index]

    def collect(self, step: int) -> None:
        """Sample, reward and batch this rank's share of `step` (all ranks call it together)."""
        s, E = self.s, self.s.examples_per_step
        mine = range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        picked = [(j, self.problem_index(step * E + j)) for j in mine]
        prompts = [self.prompts[i] for _, i in picked for _ in range(s.num_samples)]
        seeds = [seed_for(self.seed, "train", step, j, n) for j, _ in picked for n in range(s.num_samples)]
        self.synchronize()
        t0 = time.perf_counter()
        gens = self.sampler.generate(prompts, seeds, self.params())
        self.synchronize()
        local = StepStats(sampling_s=time.perf_counter() - t0)
        rollouts = []
        for g, (j, i) in enumerate(picked):
            group = []
            for n in range(s.num_samples):
                gen = gens[g * s.num_samples + n]
                text = visible_text(self.sampler.tok, gen.tokens)
                group.append(Rollout(j, self.prompts[i], gen, text, self.task.reward(text, self.problems[i])))
            rewards = torch.tensor([r.reward for r in group], dtype=torch.float64)
            for r, a in zip(group, group_advantages(rewards[None, :])[0].tolist()):
                r.advantage = a
            local.flat_groups += int(bool((rewards == rewards[0]).all()))
            local.solved_groups += int(bool((rewards >= 1.0).all()))
            rollouts += group
        local.prompts, local.completions = len(picked), len(rollouts)
        for r in rollouts:
            gen = r.generation
            local.reward_sum += r.reward
            local.reward_sq_sum += r.reward * r.reward
            local.completion_tokens += len(gen.tokens)
            local.trained_tokens += sum(not f for f in gen.forced)
            local.row_tokens += len(r.prompt) + len(gen.tokens)
            local.truncated += gen.finish == "length"
        stats = StepStats()
        for part in self.gather(local):
            stats.add(part)
        self.step, self.rollouts, self.stats = step, rollouts, stats
        self.batches = micro_batches(rollouts, self.rows, self.micro_per_step, self.pad_id, self.device, self.pad_to)
        self.on_collect(stats)


@dataclass
class Slot:
    """A micro-batch the Trainer will ask the loss for: step `step`, micro-batch `index`."""

    step: int
    index: int


class RolloutBatches:
    """The Trainer's batches for RL: slots, sampled lazily by the loss (module docstring)."""

    def __init__(self, micro_per_step: int):
        self.micro_per_step = micro_per_step
        self.step, self.index = 0, 0
        self._last: Optional[tuple[int, int]] = None

    def next_batch(self) -> Slot:
        slot = Slot(self.step, self.index)
        self._last = (self.step, self.index)
        self.index += 1
        if self.index == self.micro_per_step:
            self.step, self.index = self.step + 1, 0
        return slot

    def state_dict(self, include_last_batch: bool = False) -> dict:
        step, index = self._last if include_last_batch and self._last is not None else (self.step, self.index)
        return {"kind": "rl", "step": step, "index": index, "micro_per_step": self.micro_per_step}

    def _check(self, state: dict) -> None:
        if state.get("kind") != "rl":
            raise DataError(
                f"not an RL rollout state (kind {state.get('kind')!r}): resume continues an RL run; "
                "start RL from another stage's checkpoint with init_from"
            )

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        self.step, self.index, self._last = int(state["step"]), int(state["index"]), None

    def continue_after(self, states: Sequence[dict]) -> None:
        """Another number of ranks: the next step is the same for all (its problems are split anew)."""
        for state in states:
            self._check(state)
        self.step, self.index, self._last = max(int(s["step"]) for s in states), 0, None
