"""FLOPs per token and MFU (nanochat §1.12): formula, peak table, n/a when unknown."""

from __future__ import annotations

import math

import pytest

from chatlm.runtime.flops import attention_flops_per_token, format_mfu, mfu, peak_flops, train_flops_per_token


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 836e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
    ],
)
def test_peak_table(name, peak):
    assert peak_flops(name) == peak


def test_unknown_device_is_na_and_override_wins():
    assert peak_flops("Some Future Accelerator") is None
    assert mfu(1e9, 1e5, None) is None and format_mfu(None) == "n/a"
    assert peak_flops("NVIDIA H100 80GB HBM3", override=7.78e14) == 7.78e14


def test_d12_flops_per_token_matches_spec():
    # d12: 12 layers, C=768, H=6, D=128, T=2048, SSSL -> 9 layers at 512, 3 at 2048 (last is long).
    # Matmul params = 110,100,912 scaling params (12*12*C^2 + lm_head) + VE gates (6 layers * 6*12)
    # + smear gate 24 -> 6*N + attention; the spec's derived value is 7.60e8.
    c, layers = 768, 12
    matrices = layers * 12 * c * c + 6 * 6 * 12 + 24
    lm_head = 32768 * c
    windows = [512, 512, 512, 2048] * 3
    f = train_flops_per_token(matrices + lm_head, 6, 128, windows, 2048)
    assert math.isclose(f, 7.60e8, rel_tol=5e-3)
    assert attention_flops_per_token(6, 128, windows, 2048) == 12 * 6 * 128 * (9 * 512 + 3 * 2048)


def test_windows_longer_than_the_sequence_are_clipped():
    assert attention_flops_per_token(2, 64, [4096, 100], 1024) == 12 * 2 * 64 * (1024 + 100)


def test_mfu_value():
    # 4.78e9 FLOPs/token * 85,229 tok/s on one H100 (989e12) = 41.2% (gpu_notes.md, nanochat d24)
    assert math.isclose(mfu(4.78e9, 85229, 989e12), 0.412, abs_tol=1e-3)
    assert format_mfu(0.4119) == "41.2%"
    assert math.isclose(mfu(1e9, 8e5, 1e15, devices=8), 0.1)
