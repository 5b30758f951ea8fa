"""The policy-gradient objective (nanochat's chat_rl, spec §8): on-policy REINFORCE.

- advantage of a completion = its reward minus the mean reward of its prompt's samples (no
  division by the standard deviation, no KL term, no reference model, no importance ratio or
  clipping: the samples come from the current weights, so the ratio would be 1);
- loss = -sum over trained tokens of log p(token) * advantage, divided by the number of trained
  tokens: a token-level mean (DAPO's normalization), so long completions are not down-weighted.

nanochat divides each pass of `device_batch_size` rows by that pass's token count; here the mean
is over all trained tokens of the rank's step, so the result does not depend on how the rows are
split into micro-batches (`hardware.device_batch_size`). The two agree when the passes hold the
same number of tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class MicroBatch(NamedTuple):
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next tokens, -1 where nothing is trained (prompt, tool output, padding)
    advantages: torch.Tensor  # (B,) one per row
    scale: float  # micro-batches per step / trained tokens of the step (see token_level_loss)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, samples) rewards -> advantages: each reward minus its prompt's mean."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def token_level_loss(nll: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, scale: float) -> torch.Tensor:
    """sum over trained tokens of nll * advantage, times `scale`.

    `nll` is -log p of each target (0 where the target is -1), shaped like `targets`. With `scale`
    = 1 / trained tokens this is -sum(log p * A) / tokens; the Trainer divides each micro-batch's
    loss by the number of micro-batches, which `MicroBatch.scale` undoes."""
    trained = (targets >= 0).to(nll.dtype)
    return (nll * trained * advantages.to(nll.dtype)[:, None]).sum() * scale


def policy_gradient_loss(model: Any, batch: MicroBatch) -> torch.Tensor:
    """The Trainer's loss_fn: the model's per-token cross-entropy is -log p of each target."""
    nll = model(batch.inputs, batch.targets, loss_reduction="none").view_as(batch.targets).float()
    return token_level_loss(nll, batch.targets, batch.advantages, batch.scale)
