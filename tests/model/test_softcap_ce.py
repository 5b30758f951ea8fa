"""The fused softcapped cross-entropy (model.loss_kernel): the row kernel's contract against
autograd of nanochat's expression, both custom ops against `F.cross_entropy`, a GPT trained with
either kernel, torch.compile tracing, and the Triton kernel itself through Triton's CPU interpreter."""

import textwrap

import pytest
import torch
import torch.nn.functional as F

from chatlm.config import ModelConfig
from chatlm.model import GPT, fp8
from chatlm.model.softcap_ce import (
    fused_softcap_ce,
    linear_softcap_ce,
    plain_softcap_ce,
    softcap_ce,
    softcap_ce_rows_torch,
)

VOCAB, PADDED = 1000, 1024


def reference_rows(logits: torch.Tensor, targets: torch.Tensor, softcap: float, vocab: int):
    """Row losses and d(sum of row losses)/d logits by autograd of the plain expression, in fp64."""
    lg = logits.detach().double().requires_grad_(True)
    z = lg[:, :vocab]
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, targets, ignore_index=-1, reduction="none")
    rows.sum().backward()
    return rows.detach(), lg.grad


def make_case(rows=300, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, PADDED, generator=g) * scale
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    targets[::7] = -1  # ignored positions (SFT masks, padding)
    return logits, targets


@pytest.mark.parametrize("softcap", [15.0, 0.0])
def test_rows_match_autograd_of_the_plain_expression(softcap):
    logits, targets = make_case()
    logits[3, 10] = 80.0  # far past the cap: tanh saturates, its derivative ~0
    ref_loss, ref_grad = reference_rows(logits, targets, softcap, VOCAB)
    grad = torch.empty_like(logits)
    loss = softcap_ce_rows_torch(logits, targets, softcap, VOCAB, grad)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert (grad[:, VOCAB:] == 0).all()  # padded columns get no gradient
    assert (grad[targets == -1] == 0).all() and (loss[targets == -1] == 0).all()


def test_rows_in_place_equals_separate_buffer():
    logits, targets = make_case(rows=2500)  # more than one chunk of rows
    separate = torch.empty_like(logits)
    loss_a = softcap_ce_rows_torch(logits, targets, 15.0, VOCAB, separate)
    in_place = logits.clone()
    loss_b = softcap_ce_rows_torch(in_place, targets, 15.0, VOCAB, in_place)
    assert torch.equal(loss_a, loss_b) and torch.equal(separate, in_place)


class Head(torch.nn.Module):
    """A bias-free Linear that casts its fp32 master weight like chatlm's Linear."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("path", ["linear", "logits"])
def test_fused_loss_and_gradients_equal_the_plain_loss(dtype, tol, path):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 150, 64, generator=g)).to(dtype).requires_grad_(True)
    w = (torch.randn(PADDED, 64, generator=g) * 0.5).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (2, 150), generator=g)
    targets[:, ::5] = -1
    head = Head(w)

    ref = 3.0 * plain_softcap_ce(head(x)[..., :VOCAB], targets, 15.0)  # x3: the op must use grad_output
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, w))
    weight = w.to(dtype) if path == "linear" else None
    out = 3.0 * fused_softcap_ce(x, head, targets, 15.0, VOCAB, weight=weight)
    gx, gw = torch.autograd.grad(out, (x, w))

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # row losses are fp32 in both
    assert gx.dtype == x.dtype and gw.dtype == torch.float32
    for got, want in ((gx, ref_gx), (gw, ref_gw)):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


@pytest.mark.parametrize("path", ["linear", "logits"])
def test_all_targets_ignored_gives_nan_loss_and_zero_gradients_like_cross_entropy(path):
    """A fully masked micro-batch (SFT) must not put nan into the accumulated gradients."""
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(PADDED, 64, requires_grad=True)
    targets = torch.full((8,), -1)
    plain = plain_softcap_ce(x @ w.t(), targets, 15.0)
    assert torch.isnan(plain)
    assert all((g == 0).all() for g in torch.autograd.grad(plain, (x, w)))
    fused = fused_softcap_ce(x, Head(w), targets, 15.0, VOCAB, weight=w if path == "linear" else None)
    assert torch.isnan(fused)
    assert all((g == 0).all() for g in torch.autograd.grad(fused, (x, w)))


def test_fp16_gradients_stay_finite_where_the_plain_ones_do():
    """fp16 cannot hold G^T @ x unscaled: one token everywhere and a large channel would overflow."""
    rows = 4096
    x = torch.randn(rows, 32) * 0.5
    x[:, 0] = 20.0  # 4096 rows x 20 > 65504 if summed before scaling
    x = x.half().requires_grad_(True)
    w = (torch.randn(PADDED, 32) * 0.1).half().requires_grad_(True)
    targets = torch.full((rows,), 3)
    ref = plain_softcap_ce((x @ w.t())[:, :VOCAB], targets, 15.0)  # nanochat's expression on the same fp16 logits
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, w))
    assert torch.isfinite(ref_gx).all() and torch.isfinite(ref_gw).all()
    out = fused_softcap_ce(x, None, targets, 15.0, VOCAB, weight=w)
    gx, gw = torch.autograd.grad(out, (x, w))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for got, want in ((gx, ref_gx), (gw, ref_gw)):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 5e-3


def test_double_backward_is_refused_not_silently_wrong():
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(PADDED, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (16,))
    for weight in (w, None):
        loss = fused_softcap_ce(x, Head(w), targets, 15.0, VOCAB, weight=weight)
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(loss, (x,), create_graph=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_trace_under_torch_compile_fullgraph(backend):
    """Fake implementations and the traced backward: compiled (CPU inductor too) = eager results."""
    logits, targets = make_case(rows=64)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(PADDED, 32, requires_grad=True)

    def both(x, w, t):
        a, _ = linear_softcap_ce(x, w, t, 15.0, VOCAB)
        b, _ = softcap_ce(x @ w.t(), t, 15.0, VOCAB)
        return a + 2 * b

    eager = both(x, w, targets)
    ge = torch.autograd.grad(eager, (x, w))
    compiled = torch.compile(both, backend=backend, fullgraph=True)(x, w, targets)
    gc = torch.autograd.grad(compiled, (x, w))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def model_pair(**kw):
    """Two d4 GPTs with identical weights, loss_kernel fused and plain."""
    models = []
    for kernel in ("fused", "plain"):
        torch.manual_seed(0)
        cfg = ModelConfig(name="d4", depth=4, sequence_len=64, loss_kernel=kernel, **kw)
        with torch.device("meta"):
            m = GPT(cfg, VOCAB, attention_backend="sdpa")
        m.to_empty(device="cpu")
        m.init_weights()
        with torch.no_grad():  # leave the init point (zero lm_head) so the loss has gradients everywhere
            g = torch.Generator().manual_seed(5)
            for p in m.parameters():
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
        models.append(m)
    return models


def test_gpt_with_the_fused_loss_trains_like_the_plain_loss():
    fused, plain = model_pair()
    assert fused.fused_loss(torch.zeros(1)) and not plain.fused_loss(torch.zeros(1))
    g = torch.Generator().manual_seed(3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (fused, plain)]  # updates proportional to grads
    for step in range(4):
        idx = torch.randint(0, VOCAB, (2, 64), generator=g)
        targets = torch.roll(idx, -1, dims=1)
        targets[:, -3:] = -1
        losses = []
        for m, opt in zip((fused, plain), opts):
            loss = m(idx, targets)
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-5), step
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # evaluation keeps per-token losses through the plain expression
    idx = torch.randint(0, VOCAB, (2, 64), generator=g)
    rows = fused(idx, idx, loss_reduction="none")
    assert rows.shape == (128,)
    torch.testing.assert_close(rows.mean(), fused(idx, idx), rtol=1e-5, atol=1e-5)


def test_gpt_fp8_lm_head_takes_the_logits_path():
    fused, plain = model_pair()
    for m in (fused, plain):
        fp8.convert_to_fp8(m)
    assert type(fused.lm_head) is fp8.Float8Linear
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(4))
    with fp8.use_matmul(fp8.strict_reference_scaled_mm):
        losses, grads = [], []
        for m in (fused, plain):
            loss = m(idx, idx)
            loss.backward()
            losses.append(loss.item())
            grads.append(m.lm_head.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    rel = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    assert rel < 0.05  # each path quantizes its own grad_out to e5m2: fp8 rounding apart, not more


def test_auto_is_plain_on_cpu():
    cfg = ModelConfig(name="d4", depth=4, sequence_len=64)
    with torch.device("meta"):
        m = GPT(cfg, VOCAB, attention_backend="sdpa")
    assert not m.fused_loss(torch.zeros(1))


TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from chatlm.model.softcap_ce import softcap_ce_rows_torch
    from chatlm.model.softcap_ce_triton import softcap_ce_rows_triton
    out = {}
    g = torch.Generator().manual_seed(0)
    for softcap in (15.0, 0.0):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(9, 5000 + 120, generator=g) * 4).to(dtype)  # 2 blocks, padded tail
            targets = torch.randint(0, 5000, (9,), generator=g)
            targets[2] = -1
            targets[4] = 4999
            ga, gb = torch.empty_like(logits), logits.clone()
            la = softcap_ce_rows_torch(logits, targets, softcap, 5000, ga)
            lb = softcap_ce_rows_triton(gb, targets, softcap, 5000, gb)  # in place, as the linear op does
            wide = torch.full((9, 5120 + 64), 7.0, dtype=dtype)  # a separate buffer with another row stride
            lc = softcap_ce_rows_triton(logits, targets, softcap, 5000, wide[:, :5120])
            out[f"{softcap}_{dtype}"] = {
                "loss": (la - lb).abs().max().item(),
                "grad": (ga.float() - gb.float()).abs().max().item(),
                "grad_scale": ga.float().abs().max().item(),
                "pad_zero": bool((gb[:, 5000:] == 0).all()),
                "ignored_zero": bool((gb[2] == 0).all()) and lb[2].item() == 0.0,
                "separate_equal": bool(torch.equal(lc, lb)) and bool(torch.equal(wide[:, :5120], gb)),
                "neighbours_untouched": bool((wide[:, 5120:] == 7.0).all()),
            }
    print(json.dumps(out))
""")


def test_triton_kernel_in_the_interpreter_matches_the_torch_rows(triton_interpreter):
    results = triton_interpreter(TRITON_SCRIPT)
    assert len(results) == 4
    for key, r in results.items():
        assert r["loss"] < 1e-4, key
        bf16 = "bfloat16" in key
        assert r["grad"] <= (2**-8 * r["grad_scale"] if bf16 else 1e-6), key
        assert r["pad_zero"] and r["ignored_zero"] and r["separate_equal"] and r["neighbours_untouched"], key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_the_gpu_matches_the_torch_rows_at_d12_shape():
    pytest.importorskip("triton")
    from chatlm.model.softcap_ce_triton import softcap_ce_rows_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(4096, 32768, device="cuda", generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 32768, (4096,), device="cuda", generator=g)
    targets[::9] = -1
    ga = torch.empty_like(logits)
    la = softcap_ce_rows_torch(logits, targets, 15.0, 32768, ga)
    gb = logits.clone()
    lb = softcap_ce_rows_triton(gb, targets, 15.0, 32768, gb)  # in place, exact tanh (the default)
    assert (la - lb).abs().max().item() < 1e-5
    assert ((ga.float() - gb.float()).norm() / ga.float().norm()).item() < 1e-5
    gc = logits.clone()
    lc = softcap_ce_rows_triton(gc, targets, 15.0, 32768, gc, fast_tanh=True)  # the hardware tanh.approx
    assert (la - lc).abs().max().item() < 2e-4
    assert ((ga.float() - gc.float()).norm() / ga.float().norm()).item() < 1e-4

    # the compiled fused op against the compiled plain expression, d12's lm_head
    x = F.rms_norm(torch.randn(8192, 768, device="cuda", generator=g), (768,)).bfloat16().requires_grad_(True)
    w = (torch.randn(32768, 768, device="cuda", generator=g) * 0.15).requires_grad_(True)
    t = torch.randint(0, 32768, (8192,), device="cuda", generator=g)
    plain = torch.compile(lambda x, w, t: plain_softcap_ce(F.linear(x, w.bfloat16()), t, 15.0))
    fused = torch.compile(lambda x, w, t: fused_softcap_ce(x, None, t, 15.0, 32768, weight=w.bfloat16()))
    ref, out = plain(x, w, t), fused(x, w, t)
    assert abs(ref.item() - out.item()) < 1e-4
    for a, b in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(ref, (x, w))):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
