"""Advantages and the token-level REINFORCE loss against hand computations, the training rows'
masks (prompt, tool output and padding untrained; the sampled stop token trained), micro-batch
independence, and the rollout stream's resumable state."""

from __future__ import annotations

import pytest
import torch

from chatlm.data.shards import DataError
from chatlm.rollouts.objective import MicroBatch, group_advantages, policy_gradient_loss, token_level_loss
from chatlm.rollouts.sampling import Generation, Rollout, RolloutBatches, micro_batches


def test_advantage_is_reward_minus_the_prompts_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    assert group_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [0.625, 0.125, -0.375, -0.375]]


def test_token_level_loss_by_hand():
    nll = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.25, 4.0]])
    targets = torch.tensor([[5, 6, -1], [7, -1, -1]])  # 3 trained tokens; the nll under -1 must not count
    advantages = torch.tensor([0.5, -1.0])
    # (0.5 * 0.5 + 1.0 * 0.5 + 1.5 * -1.0) / 3 = -0.75 / 3
    assert token_level_loss(nll, targets, advantages, 1 / 3).item() == -0.25
    assert token_level_loss(nll, targets, torch.zeros(2), 1 / 3).item() == 0.0


def test_policy_gradient_loss_is_minus_mean_logp_times_advantage(rl_gpt):
    gpt = rl_gpt
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (3, 9), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :3] = -1  # a prompt
    targets[2, 5:] = -1  # padding
    advantages = torch.tensor([1.0, -0.5, 0.25])
    trained = int((targets >= 0).sum())
    loss = policy_gradient_loss(gpt, MicroBatch(inputs, targets, advantages, 1 / trained))
    logp = torch.log_softmax(gpt(inputs).float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets >= 0)
    expected = -(picked * advantages[:, None]).sum() / trained
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_a_gradient_step_raises_the_good_completion_and_lowers_the_bad(rl_gpt):
    import copy

    model = copy.deepcopy(rl_gpt).train()
    prompt = [1, 2, 3, 4]
    good, bad = prompt + [10, 11, 12], prompt + [20, 21, 22]
    ids = torch.tensor([good, bad])
    targets = ids[:, 1:].clone()
    targets[:, : len(prompt) - 1] = -1
    batch = MicroBatch(ids[:, :-1], targets, torch.tensor([0.5, -0.5]), 1 / 6)

    def logps():
        with torch.no_grad():
            logp = torch.log_softmax(model(batch.inputs).float(), -1)
            return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][:, len(prompt) - 1 :].sum(-1)

    before = logps()
    policy_gradient_loss(model, batch).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = logps()
    assert after[0] > before[0] and after[1] < before[1]


BOS, START, END, OUT_START, OUT_END, STOP = 1, 2, 3, 4, 5, 6


def rollout(prompt, tokens, forced, advantage, problem=0) -> Rollout:
    return Rollout(problem, prompt, Generation(tokens, forced, "stop"), "", 0.0, advantage)


def test_rows_train_only_sampled_completion_tokens():
    # prompt | sampled 30, a calculator call 31, forced output 40 41, sampled 32 and the stop token
    a = rollout(
        [BOS, 7, 8], [30, START, 31, END, OUT_START, 40, 41, OUT_END, 32, STOP], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0], 0.5
    )
    b = rollout([BOS, 9], [33, STOP], [0, 0], -0.5, problem=1)
    (batch,) = micro_batches([a, b], rows=2, count=1, pad_id=STOP, device="cpu")
    assert batch.inputs.tolist() == [
        [BOS, 7, 8, 30, START, 31, END, OUT_START, 40, 41, OUT_END, 32],
        [BOS, 9, 33, STOP, STOP, STOP, STOP, STOP, STOP, STOP, STOP, STOP],
    ]
    n = -1
    assert batch.targets.tolist() == [
        [n, n, 30, START, 31, END, n, n, n, n, 32, STOP],  # prompt and forced output untrained
        [n, 33, STOP, n, n, n, n, n, n, n, n, n],  # padding untrained
    ]
    assert batch.advantages.tolist() == [0.5, -0.5] and batch.scale == 1 / 8  # 6 + 2 trained tokens


def test_loss_does_not_depend_on_how_rows_are_split():
    g = torch.Generator().manual_seed(1)
    rollouts = [
        rollout([BOS, 7], torch.randint(10, 50, (int(n),), generator=g).tolist() + [STOP], [0] * (int(n) + 1), a)
        for n, a in zip(torch.randint(1, 12, (7,), generator=g), torch.randn(7, generator=g).tolist())
    ]

    def loss(rows):
        count = -(-len(rollouts) // rows)
        total = 0.0
        for mb in micro_batches(rollouts, rows=rows, count=count, pad_id=STOP, device="cpu"):
            nll = (mb.inputs.float() % 7 + 1)[:, : mb.targets.size(1)]  # any per-token value
            total += token_level_loss(nll, mb.targets, mb.advantages, mb.scale).item() / count
        return total

    whole = loss(7)
    for rows in (1, 2, 3, 4):
        assert loss(rows) == pytest.approx(whole, rel=1e-6)
    # a rank with fewer rows than micro-steps gets empty (zero) micro-batches, not fewer steps
    extra = micro_batches(rollouts[:1], rows=1, count=3, pad_id=STOP, device="cpu")
    assert len(extra) == 3 and int((extra[2].targets >= 0).sum()) == 0


def test_rollout_batches_hand_out_slots_and_resume_at_the_pending_one():
    batches = RolloutBatches(micro_per_step=3)
    slots = [batches.next_batch() for _ in range(4)]
    assert [(s.step, s.index) for s in slots] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    saved = batches.state_dict(include_last_batch=True)  # the Trainer already holds (1, 0)
    assert (saved["step"], saved["index"]) == (1, 0)
    again = RolloutBatches(micro_per_step=3)
    again.load_state_dict(saved)
    assert (again.next_batch().step, again.next_batch().index) == (1, 1)
    other = RolloutBatches(micro_per_step=2)
    other.continue_after([saved, {**saved, "step": 4}])
    assert other.next_batch().step == 4
    with pytest.raises(DataError, match="not an RL .* init_from"):  # one line, not a traceback
        other.load_state_dict({"kind": "sft"})
