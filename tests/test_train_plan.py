"""plan_run: the numbers a run derives from its config (nanochat §3.2-3.3)."""

from __future__ import annotations

import pytest

from chatlm.config import ConfigError, HardwareConfig, ModelConfig, TrainConfig
from chatlm.training.hooks import due
from chatlm.training.plan import plan_run


def cfg_for(depth: int, ratio: float = 12.0, device_batch: int = 32, **kw) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name=f"d{depth}", depth=depth),
        target_param_data_ratio=ratio,
        hardware=HardwareConfig(device_batch_size=device_batch),
        **kw,
    )


def test_d24_speedrun_plan():
    p = plan_run(cfg_for(24, ratio=8.0, device_batch=16), vocab_size=32768, world_size=8)
    assert (p.n_embd, p.n_head, p.n_layer) == (1536, 12, 24)
    assert p.params["total"] == 1_384_122_122 and p.scaling_params == 729_810_624
    assert p.total_batch_size == 1_048_576 and p.grad_accum == 4 and p.num_iterations == 5568
    assert p.batch_lr_scale == pytest.approx(2**0.5)
    assert p.total_flops == pytest.approx(2.79e19, rel=0.01)
    assert p.windows.count(512) == 18 and p.windows[-1] == 2048


def test_d12_reference_and_d20_transfer():
    d12 = plan_run(cfg_for(12), 32768, 1)
    assert d12.total_batch_size == 524_288 and d12.grad_accum == 8 and d12.muon_weight_decay == pytest.approx(0.28)
    d20 = plan_run(cfg_for(20), 32768, 8)
    assert d20.total_batch_size == 1_048_576 and d20.muon_weight_decay == pytest.approx(0.100, abs=1e-3)


def test_explicit_horizon_and_batch():
    p = plan_run(cfg_for(4, device_batch=2, steps=7, total_batch_size=4 * 2048), 512, 1)
    assert p.num_iterations == 7 and p.total_batch_size == 8192 and p.grad_accum == 2
    with pytest.raises(ConfigError, match="total_batch_size") as e:
        plan_run(cfg_for(4, device_batch=2, steps=7, total_batch_size=3000), 512, 1)
    assert "device_batch_size" in str(e.value)


def test_due():
    assert [s for s in range(11) if due(s, 5, s == 10)] == [5, 10]
    assert not due(0, 5, False) and due(0, 5, False, at_start=True) and not due(0, -1, False, at_start=True)
    assert due(3, -1, True) and not due(3, -1, False)
