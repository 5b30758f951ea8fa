"""Dynamic loss scaling: unscale, skip on non-finite gradients, halve and grow the scale."""

from __future__ import annotations

import torch

from chatlm.optim.loss_scale import LossScaler


def test_unscale_and_growth():
    p = torch.nn.Parameter(torch.ones(3))
    s = LossScaler(init_scale=8.0, growth_interval=2)
    (s.scale_loss(p.sum())).backward()
    assert torch.equal(p.grad, torch.full((3,), 8.0))
    assert s.unscale_and_check([p]) and torch.equal(p.grad, torch.ones(3))
    s.update(True)
    s.update(True)
    assert s.scale == 16.0


def test_inf_skips_and_halves():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("inf")])
    s = LossScaler(init_scale=4.0)
    assert not s.unscale_and_check([p])
    s.update(False)
    assert s.scale == 2.0 and s.state_dict() == {"scale": 2.0, "good_steps": 0}


def test_disabled_is_identity():
    s = LossScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert s.scale_loss(loss) is loss and s.unscale_and_check([]) is True
