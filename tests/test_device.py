"""Device and dtype policy: decided from explicit inputs, no import-time state."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from chatlm.config import ConfigError, DType, HardwareConfig, PrecisionConfig
from chatlm.runtime.device import DevicePolicy, choose_dtype, seed_everything


@pytest.mark.parametrize(
    "requested,device,cap,expected",
    [
        ("auto", "cuda", (9, 0), torch.bfloat16),
        ("auto", "cuda", (8, 0), torch.bfloat16),
        ("auto", "cuda", (7, 5), torch.float32),
        ("auto", "cpu", None, torch.float32),
        ("auto", "mps", None, torch.float32),
        ("bfloat16", "cpu", None, torch.bfloat16),
        ("float32", "cuda", (9, 0), torch.float32),
        ("float16", "cuda", (7, 0), torch.float16),
    ],
)
def test_choose_dtype(requested, device, cap, expected):
    dtype, reason = choose_dtype(requested, device, cap)
    assert dtype == expected and reason


def test_reason_says_why():
    assert "SM 75 < 80" in choose_dtype("auto", "cuda", (7, 5))[1]
    assert choose_dtype("bfloat16", "cpu")[1] == "set by precision.dtype"


def test_fp16_and_fp8_need_cuda():
    with pytest.raises(ConfigError, match="precision.dtype"):
        choose_dtype("float16", "cpu")
    with pytest.raises(ConfigError, match="precision.fp8"):
        DevicePolicy.create(HardwareConfig(), PrecisionConfig(fp8=True), torch.device("cpu"))


def test_policy_on_cpu_never_compiles():
    p = DevicePolicy.create(HardwareConfig(compile=True), PrecisionConfig(dtype=DType.bfloat16), torch.device("cpu"))
    assert p.compute_dtype == torch.bfloat16 and p.compile is False
    assert p.describe() == {
        "device": "cpu",
        "compute_dtype": "bfloat16",
        "dtype_reason": "set by precision.dtype",
        "tf32": True,
        "compile": False,
        "compile_mode": None,
        "fp8": False,
        "deterministic": False,
    }
    m = torch.nn.Linear(2, 2)
    assert p.maybe_compile(m) is m and p.compile_model(m) is m


def test_compile_mode_reaches_torch_compile():
    hw = HardwareConfig(compile=True, compile_mode="max-autotune-no-cudagraphs")
    p = DevicePolicy.create(hw, PrecisionConfig(), torch.device("cpu"))
    assert p.describe()["compile_mode"] == "max-autotune-no-cudagraphs"
    forced = dataclasses.replace(p, compile=True, compile_mode="default")  # as on CUDA, but cheap on CPU
    m = torch.nn.Linear(4, 3)
    compiled = forced.compile_model(m)
    assert compiled is not m and compiled._orig_mod is m
    x = torch.randn(5, 4)
    torch.testing.assert_close(compiled(x), m(x))
    with pytest.raises(ConfigError, match="hardware.compile_mode"):
        HardwareConfig(compile_mode="fastest")


def test_seed_everything_is_repeatable():
    import random

    import numpy as np

    seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(7)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_deterministic_policy_sets_the_process_switches(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(inductor_config, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    p = DevicePolicy.create(HardwareConfig(deterministic=True), PrecisionConfig(), torch.device("cpu"))
    assert p.describe()["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        p.apply(seed=0)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert inductor_config.deterministic and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
    # the default policy leaves them alone
    DevicePolicy.create(HardwareConfig(), PrecisionConfig(), torch.device("cpu")).apply(seed=0)
    assert not torch.are_deterministic_algorithms_enabled()
