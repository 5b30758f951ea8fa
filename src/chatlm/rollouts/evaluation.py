"""pass@k of a task's eval slice through the same sampler as training (nanochat evaluates RL with
pass@1..8 on the first 400 GSM8K test problems, temperature 1.0, top-k 50).

Each problem gets `k` samples whose seeds depend only on the run seed, the problem and the sample
(not on the step), so successive evaluations differ only by the weights. A sample passes when its
reward is a full 1.0. With several ranks each samples every world_size-th problem and the counts
are gathered. pass@k is the unbiased estimator of `chatlm.evals.chat.pass_at_k`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from chatlm.evals.chat import pass_at_k
from chatlm.rollouts.problems import Problem
from chatlm.rollouts.sampling import Sampler, seed_for, visible_text
from chatlm.tokenizer.chat_format import render_for_completion


def evaluate_pass_at_k(
    sampler: Sampler,
    task: Any,
    problems: Sequence[Problem],
    k: int,
    params: Any,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] = lambda x: [x],
) -> dict:
    """{"pass@1": ..., ..., f"pass@{k}": ..., "eval_reward": mean reward, "eval_problems": n}."""
    tok = sampler.tok
    mine = [(g, p) for g, p in enumerate(problems) if g % world_size == rank]
    prompts = [render_for_completion(tok, p.conversation()) for _, p in mine for _ in range(k)]
    seeds = [seed_for(seed, "eval", g, n) for g, _ in mine for n in range(k)]
    gens = sampler.generate(prompts, seeds, params)
    counts, reward = [], 0.0
    for m, (_, p) in enumerate(mine):
        rewards = [task.reward(visible_text(tok, gen.tokens), p) for gen in gens[m * k : (m + 1) * k]]
        counts.append(sum(r >= 1.0 for r in rewards))
        reward += sum(rewards)
    parts = gather((counts, reward))
    all_counts = [c for part_counts, _ in parts for c in part_counts]
    n = max(1, len(all_counts))
    out = {f"pass@{j}": sum(pass_at_k(k, c, j) for c in all_counts) / n for j in range(1, k + 1)}
    out["eval_reward"] = sum(r for _, r in parts) / (n * k)
    return out
