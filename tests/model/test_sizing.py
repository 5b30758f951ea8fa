"""Derived dimensions: the spec's parameter table, windows, special layers and config errors."""

import dataclasses

import pytest
import torch

from chatlm.config import ConfigError, ModelConfig
from chatlm.model import GPT, derive_dims
from chatlm.model.sizing import default_short_window, padded_vocab

# depth -> (C, H, VE layers, total params, scaling params, FLOPs/token) from nanochat_spec §1.2.
SPEC_TABLE = {
    12: (768, 6, 6, 286_261_730, 110_100_912, 7.60e8),
    16: (1024, 8, 8, 536_871_738, 234_881_792, 1.59e9),
    20: (1280, 10, 10, 896_533_746, 435_160_240, 2.89e9),
    24: (1536, 12, 12, 1_384_122_122, 729_810_624, 4.78e9),
    26: (1664, 13, 13, 1_681_786_938, 918_423_532, 5.99e9),
    32: (2048, 16, 16, 2_818_575_450, 1_677_724_672, 1.08e10),
}


def meta_model(depth: int, **kw) -> GPT:
    with torch.device("meta"):
        return GPT(ModelConfig(depth=depth, **kw), vocab_size=32768, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("depth", sorted(SPEC_TABLE))
def test_param_counts_match_spec_table(depth):
    C, H, n_ve, total, scaling, flops = SPEC_TABLE[depth]
    model = meta_model(depth)
    assert model.dims.n_embd == C and model.dims.n_head == H and model.dims.n_kv_head == H
    assert len(model.dims.ve_layers) == n_ve == len(model.value_embeds)
    counts = model.num_params()
    assert counts["total"] == total
    assert model.num_scaling_params() == scaling
    # the table's FLOPs are given to 3 significant digits
    assert model.flops_per_token() == pytest.approx(flops, rel=6e-3)


def test_d24_breakdown():
    counts = meta_model(24).num_params()
    assert counts == {
        "wte": 50_331_648,
        "lm_head": 50_331_648,
        "value_embeds": 603_979_776,
        "transformer_matrices": 679_478_976,
        "scalars": 74,
        "total": 1_384_122_122,
    }


def test_flops_d12_exact():
    model = meta_model(12)
    matmul = 84_935_088 + 25_165_824 + 24  # blocks (incl. VE gates) + lm_head + smear gate
    attn = 12 * 768 * (9 * 512 + 3 * 2048)
    assert model.num_matmul_params() == matmul
    assert model.flops_per_token() == 6 * matmul + attn


def test_windows_t2048():
    d24 = derive_dims(ModelConfig(depth=24), 32768)
    assert d24.short_window == 512 and d24.long_window == 2048
    assert d24.windows.count(512) == 18 and d24.windows.count(2048) == 6
    assert d24.windows[:4] == (512, 512, 512, 2048) and d24.windows[-1] == 2048
    d12 = derive_dims(ModelConfig(depth=12), 32768)
    assert (d12.windows.count(512), d12.windows.count(2048)) == (9, 3)
    # the last layer is forced to L even when the pattern would put S there (d26: 26 % 4 == 2)
    d26 = derive_dims(ModelConfig(depth=26), 32768)
    assert d26.window_chars() == "SSSL" * 6 + "SL"
    d5 = derive_dims(ModelConfig(depth=5, window_pattern="s"), 32768)
    assert d5.window_chars() == "SSSSL"


def test_short_window_formula_and_override():
    assert default_short_window(2048, 4, 128) == 512
    assert default_short_window(512, 4, 128) == 128
    assert default_short_window(1000, 4, 128) == 256  # ceil(250 / 128) * 128
    assert default_short_window(4096, 3, 128) == 1408  # ceil(1365.33 / 128) * 128
    assert default_short_window(64, 4, 128) == 128  # not capped at T: nanochat keeps 128
    assert default_short_window(513, 4, 128) == 256  # ceil(513 / 512) * 128, nanochat's order of operations
    dims = derive_dims(ModelConfig(depth=4, sequence_len=64, short_window=8), 100)
    assert dims.windows == (8, 8, 8, 64)


def test_ve_layers_backout_vocab():
    assert derive_dims(ModelConfig(depth=24), 32768).ve_layers == frozenset(range(1, 24, 2))
    assert derive_dims(ModelConfig(depth=3), 32768).ve_layers == frozenset({0, 2})
    assert derive_dims(ModelConfig(depth=24), 32768).backout_layer == 12
    assert derive_dims(ModelConfig(depth=5), 32768).backout_layer == 2
    assert derive_dims(ModelConfig(depth=6, backout_layer=1), 32768).backout_layer == 1
    assert derive_dims(ModelConfig(depth=6, backout=False), 32768).backout_layer is None
    assert derive_dims(ModelConfig(depth=6, value_embeds=False), 32768).ve_layers == frozenset()
    assert padded_vocab(50257, 64) == 50304 and padded_vocab(32768, 64) == 32768
    dims = derive_dims(ModelConfig(depth=2, aspect_ratio=48, head_dim=32), 100)
    assert (dims.n_embd, dims.n_head, dims.padded_vocab_size, dims.rope_len) == (96, 3, 128, 20480)
    # width is rounded *up* to the head dim: d25 -> 1600 -> 1664
    assert derive_dims(ModelConfig(depth=25), 32768).n_embd == 1664


def _mutated(**changes) -> ModelConfig:
    """A config changed after construction (as an OmegaConf merge can), bypassing __post_init__."""
    cfg = ModelConfig(depth=4, aspect_ratio=32, head_dim=32, sequence_len=64)
    for k, v in changes.items():
        object.__setattr__(cfg, k, v)
    return cfg


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"n_kv_head": 3}, "model.n_kv_head"),  # 4 heads, 3 kv heads
        ({"n_kv_head": 8}, "model.n_kv_head"),
        ({"short_window": 129}, "model.short_window"),  # > sequence_len and > the derived 128
        ({"head_dim": 33}, "model.head_dim"),
        ({"window_pattern": "SXL"}, "model.window_pattern"),
        ({"backout_layer": 4}, "model.backout_layer"),
        ({"smear_channels": 1000}, "model.smear_channels"),
        ({"ve_gate_channels": 1000}, "model.ve_gate_channels"),
        ({"depth": 0}, "model.depth"),
    ],
)
def test_config_errors_name_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        derive_dims(_mutated(**changes), 100)
    assert err.value.key == key
    with pytest.raises(ConfigError):
        with torch.device("meta"):
            GPT(_mutated(**changes), 100)


def test_vocab_required_and_dims_frozen():
    with pytest.raises(ConfigError) as err:
        derive_dims(ModelConfig(depth=2), None)
    assert err.value.key == "model.vocab_size"
    dims = derive_dims(ModelConfig(depth=2, vocab_size=300), None)
    assert dims.vocab_size == 300 and dims.padded_vocab_size == 320
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.n_embd = 1
    assert dims.as_dict()["windows"] == list(dims.windows)
