"""LR / momentum / WD schedules and the depth transfer, checked against the spec's numbers."""

import math

import pytest

from chatlm.config import ScheduleConfig, ScheduleKind
from chatlm.optim import (
    auto_batch_size,
    batch_lr_scale,
    depth_transfer,
    lr_multiplier,
    lr_multiplier_from_config,
    muon_momentum,
    muon_weight_decay,
    num_iterations,
)

N_D12, N_D16, N_D20, N_D24, N_D26, N_D32 = (
    110_100_912,
    234_881_792,
    435_160_240,
    729_810_624,
    918_423_532,
    1_677_724_672,
)


def test_warmdown_lr_multiplier():
    n = 1000  # warmdown = round(0.65 * 1000) = 650 steps, starting after step 350
    assert lr_multiplier(0, n) == pytest.approx(1 / 40)
    assert lr_multiplier(19, n) == pytest.approx(0.5)
    assert lr_multiplier(39, n) == 1.0
    assert lr_multiplier(40, n) == 1.0
    assert lr_multiplier(350, n) == 1.0
    assert lr_multiplier(351, n) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr_multiplier(675, n) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(1000, n) == pytest.approx(0.05)


def test_speedrun_warmdown_boundaries():
    n = 5568  # d24 speedrun horizon: round(0.65 * 5568) = 3619 warmdown steps
    assert lr_multiplier(n - 3619, n) == 1.0
    assert lr_multiplier(n - 3619 + 1, n) < 1.0
    assert lr_multiplier(n, n) == pytest.approx(0.05)


def test_cosine_and_constant():
    n = 1000
    for kind in ("cosine", "constant", ScheduleKind.cosine):
        assert lr_multiplier(0, n, kind) == pytest.approx(1 / 40)
        assert lr_multiplier(40, n, kind) == pytest.approx(1.0)
    assert lr_multiplier(520, n, "cosine") == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_multiplier(n, n, "cosine") == pytest.approx(0.05)
    assert lr_multiplier(n, n, "constant") == 1.0
    assert lr_multiplier(0, n, "constant", warmup_steps=0) == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(50, n, "linear")


def test_from_config_uses_nanochat_defaults():
    cfg = ScheduleConfig()
    assert [lr_multiplier_from_config(cfg, it, 1000) for it in (0, 500, 1000)] == [
        lr_multiplier(it, 1000) for it in (0, 500, 1000)
    ]


def test_muon_momentum():
    n = 5568  # warmdown starts at step 1949
    assert muon_momentum(0, n) == pytest.approx(0.85)
    assert muon_momentum(200, n) == pytest.approx(0.91)
    assert muon_momentum(400, n) == pytest.approx(0.97)
    assert muon_momentum(1949, n) == pytest.approx(0.97)
    assert muon_momentum(1949 + 3619 // 2, n) == pytest.approx(0.97 - 0.07 * (3619 // 2) / 3619)
    assert muon_momentum(n, n) == pytest.approx(0.90)
    # a short run: its warmdown (from step 35) starts inside the 400-step momentum warmup, which wins
    assert muon_momentum(50, 100) == pytest.approx(0.85 + 0.12 * 50 / 400)


def test_muon_weight_decay_cosine():
    assert muon_weight_decay(0, 1000, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(500, 1000, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(250, 1000, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert muon_weight_decay(1000, 1000, 0.2) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "n,batch,wd,lr_scale",
    [
        (N_D12, 524_288, 0.28, 1.0),
        (N_D16, 524_288, 0.131, 1.0),
        (N_D20, 1_048_576, 0.100, math.sqrt(2)),
        (N_D24, 1_048_576, 0.0597, math.sqrt(2)),
        (N_D26, 1_048_576, 0.0475, math.sqrt(2)),
        (N_D32, 2_097_152, 0.0368, 2.0),
    ],
)
def test_depth_transfer_matches_spec(n, batch, wd, lr_scale):
    tr = depth_transfer(n, N_D12)  # ratio 12, wd 0.28, B_ref 2^19
    assert tr.batch_tokens == batch
    assert tr.weight_decay == pytest.approx(wd, abs=6e-4)
    assert tr.batch_lr_scale == pytest.approx(lr_scale)
    assert tr.target_tokens == 12 * n
    assert tr.num_iterations == 12 * n // batch


def test_speedrun_d24_horizon():
    tr = depth_transfer(N_D24, N_D12, target_param_data_ratio=8)
    assert tr.batch_tokens == 1_048_576
    assert tr.num_iterations == 5568
    assert tr.num_iterations * tr.batch_tokens == pytest.approx(5.84e9, rel=1e-3)


def test_horizon_precedence_and_overrides():
    assert (
        num_iterations(
            1 << 20, steps=7, target_flops=1e19, flops_per_token=1e9, target_param_data_ratio=12, scaling_params=N_D24
        )
        == 7
    )
    assert num_iterations(
        1 << 20, target_flops=2.79e19, flops_per_token=4.78e9, target_param_data_ratio=12, scaling_params=N_D24
    ) == round(2.79e19 / (4.78e9 * 2**20))
    assert num_iterations(1 << 20, target_param_data_ratio=8, scaling_params=N_D24) == 5568
    with pytest.raises(ValueError):
        num_iterations(1 << 20)
    tr = depth_transfer(N_D24, N_D12, total_batch_size=1 << 19, steps=10)
    assert tr.batch_tokens == 1 << 19 and tr.batch_lr_scale == 1.0 and tr.num_iterations == 10
    assert auto_batch_size(12 * N_D12, 12 * N_D12) == 1 << 19
    assert batch_lr_scale(1 << 21) == 2.0
