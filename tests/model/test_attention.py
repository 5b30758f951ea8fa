"""Every backend that runs here against a plain float64 softmax attention written out below."""

import math
import warnings

import pytest
import torch

from chatlm.config import AttentionBackend, ConfigError
from chatlm.model.attention import (
    backend_unavailable_reason,
    causal_attention,
    prepare_backend,
    select_backend,
    window_mask,
)


def reference_attention(q, k, v, window):
    """q: (B, Tq, H, D), k/v: (B, Tk, Hkv, D); queries are the last Tq positions. float64 loops."""
    q, k, v = q.double(), k.double(), v.double()
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, Tq, H, D, dtype=torch.float64)
    for h in range(H):
        kh = h // (H // Hkv)  # GQA: consecutive query heads share a kv head
        for r in range(Tq):
            p = Tk - Tq + r
            cols = [c for c in range(Tk) if c <= p and p - c <= window]
            s = torch.einsum("bd,bcd->bc", q[:, r, h], k[:, cols, kh]) / math.sqrt(D)
            out[:, r, h] = torch.einsum("bc,bcd->bd", torch.softmax(s, dim=-1), v[:, cols, kh])
    return out


def _flex_runs_here() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.randn(1, 4, 2, 8)
            causal_attention(q, q, q, window=1, backend="flex")
        return True
    except Exception:
        return False


BACKENDS = ["sdpa"] + (["flex"] if _flex_runs_here() else [])


@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def _qkv(B, Tq, Tk, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Tq, H, D, generator=g),
        torch.randn(B, Tk, Hkv, D, generator=g),
        torch.randn(B, Tk, Hkv, D, generator=g),
    )


def test_window_mask_semantics():
    m = window_mask(6, 6, 2, "cpu")
    # window=2: a query sees 2 previous tokens plus itself
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True] + [False] * 5
    assert m.sum().item() == 1 + 2 + 3 + 3 + 3 + 3
    # bottom-right alignment: 2 queries over 6 keys are positions 4 and 5
    assert window_mask(2, 6, 10, "cpu").tolist() == [[True] * 5 + [False], [True] * 6]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [0, 3, 16, 100])
def test_prefill_matches_reference(backend, H, Hkv, window):
    q, k, v = _qkv(2, 16, 16, H, Hkv, 8)
    y = causal_attention(q, k, v, window=window, backend=backend)
    assert y.shape == (2, 16, H, 8) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, window), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif("flex" not in BACKENDS, reason="FlexAttention does not run here")
def test_compiled_flex_matches_reference_without_dynamo_cache_warning():
    # Inside torch.compile the block mask is built without the lru_cache (dynamo would ignore the
    # cache and warn on every compiled training run); eager calls keep the cache.
    q, k, v = _qkv(1, 48, 64, 2, 1, 8, seed=3)  # 48 queries over 64 keys, GQA
    fn = torch.compile(lambda q, k, v: causal_attention(q, k, v, window=10, backend="flex"), dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fn(q, k, v)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, 10), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [2, 5, 40])
def test_queries_are_the_last_positions(backend, window):
    q, k, v = _qkv(2, 5, 13, 4, 2, 8, seed=1)
    y = causal_attention(q, k, v, window=window, backend=backend)
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, window), atol=2e-5, rtol=1e-4)


def test_decode_slices_to_window():
    """Tq == 1 uses only the last window+1 keys: changing older keys must not change the output."""
    q, k, v = _qkv(1, 1, 12, 2, 2, 8, seed=3)
    y1 = causal_attention(q, k, v, window=4, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[:, :7] += 5.0
    v2[:, :7] -= 3.0
    y2 = causal_attention(q, k2, v2, window=4, backend="sdpa")
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(y1.double(), reference_attention(q, k, v, 4), atol=2e-5, rtol=1e-4)


def test_select_backend_cpu():
    assert select_backend(AttentionBackend.auto, "cpu", torch.float32) == "sdpa"
    assert select_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert backend_unavailable_reason("sdpa", "cpu", torch.float32) is None
    assert "CUDA" in backend_unavailable_reason("flex", "cpu", torch.float32)
    assert "CUDA" in backend_unavailable_reason("fa4", "cpu", torch.bfloat16)
    prepare_backend("sdpa")  # no-op, must not raise
    assert select_backend("sdpa", torch.device("cpu"), torch.bfloat16) == "sdpa"
    for forced in (AttentionBackend.flex, AttentionBackend.fa4, "bogus"):
        with pytest.raises(ConfigError) as err:
            select_backend(forced, "cpu", torch.bfloat16)
        assert err.value.key == "model.attention_backend"


def test_bad_shapes_rejected():
    q, k, v = _qkv(1, 8, 4, 4, 4, 8)
    with pytest.raises(ValueError):
        causal_attention(q, k, v, window=8, backend="sdpa")  # more queries than keys
    q, k, v = _qkv(1, 4, 4, 4, 3, 8)
    with pytest.raises(ValueError):
        causal_attention(q, k, v, window=8, backend="sdpa")  # 4 heads over 3 kv heads
    q, k, v = _qkv(1, 4, 4, 4, 4, 8)
    with pytest.raises(ValueError):
        causal_attention(q, k, v, window=8, backend="nope")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_single_query_attention_equals_masked_sdpa(heads, kv_heads):
    from chatlm.model.attention import single_query_attention

    g = torch.Generator().manual_seed(3)
    n, S, D = 3, 11, 8
    q = torch.randn(n, 1, heads, D, generator=g)
    keys = torch.randn(n, kv_heads, S, D, generator=g)
    values = torch.randn(n, kv_heads, S, D, generator=g)
    visible = torch.arange(S)[None, :] <= torch.tensor([0, 5, 10])[:, None]  # one, six, all keys
    bias = torch.zeros(n, 1, 1, S).masked_fill(~visible.view(n, 1, 1, S), float("-inf"))
    got = single_query_attention(q, keys, values, bias)
    group = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.repeat_interleave(group, dim=1),
        values.repeat_interleave(group, dim=1),
        attn_mask=visible.view(n, 1, 1, S),
    ).transpose(1, 2)
    assert got.shape == (n, 1, heads, D)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the first sequence sees only key 0, so its output is exactly value 0 of its kv head
    torch.testing.assert_close(got[0, 0, 0], values[0, 0, 0])
