"""`chatlm::qkv_rope`: RoPE + QK-norm (+ the value-embedding add) over the fused q|k|v row.

Every implementation is held against autograd through nanochat's expression (`qkv_rope_torch`):
the op's PyTorch path here, its Triton kernels in the Triton interpreter (a subprocess, since
TRITON_INTERPRET must be set before Triton is imported) and on the GPU.
"""

import textwrap

import pytest
import torch

from chatlm.model.qkv_rope import qkv_rope, qkv_rope_backward_torch, qkv_rope_forward_torch, qkv_rope_op, qkv_rope_torch


def rope_tables(T: int, D: int, dtype=torch.float32):
    freqs = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * freqs[None, :]
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def inputs(B=2, T=7, H=4, Hkv=2, D=16, dtype=torch.float32, extra=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 2).to(dtype)
    v_extra = torch.randn(B, T, Hkv, D, generator=g).to(dtype) if extra else None
    cos, sin = rope_tables(T, D, dtype)
    grads = [torch.randn(B, T, h, D, generator=g).to(dtype) for h in (H, Hkv, Hkv)]
    return qkv, v_extra, cos, sin, grads


def autograd_reference(qkv, v_extra, cos, sin, grads, H, Hkv, scale):
    leaf = qkv.detach().requires_grad_(True)
    vx = v_extra.detach().requires_grad_(True) if v_extra is not None else None
    outs = qkv_rope_torch(leaf, cos, sin, vx, H, Hkv, scale)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], leaf.grad, (vx.grad if vx is not None else None)


@pytest.mark.parametrize("extra", [True, False])
def test_op_forward_and_backward_match_autograd_of_nanochats_expression(extra):
    qkv, v_extra, cos, sin, grads = inputs(extra=extra)
    outs_ref, dqkv_ref, dvx_ref = autograd_reference(qkv, v_extra, cos, sin, grads, 4, 2, 1.2)
    leaf = qkv.clone().requires_grad_(True)
    vx = v_extra.clone().requires_grad_(True) if extra else None
    outs = qkv_rope(leaf, cos, sin, vx, 4, 2, 1.2)
    for o, r in zip(outs, outs_ref):
        assert o.shape == r.shape and o.is_contiguous()
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    torch.autograd.backward(outs, grads)
    torch.testing.assert_close(leaf.grad, dqkv_ref, rtol=1e-5, atol=1e-5)
    assert dqkv_ref.abs().max() > 0.1  # a real gradient, not zeros on both sides
    if extra:
        torch.testing.assert_close(vx.grad, dvx_ref)


def test_backward_is_the_exact_derivative_of_the_forward_with_bf16_tables():
    """With bf16 RoPE tables (cos^2 + sin^2 != 1) the op's formulas still agree with each other:
    the backward formula equals autograd through the forward formula."""
    qkv, v_extra, _, _, grads = inputs()
    cos, sin = (t.to(torch.bfloat16).float() for t in rope_tables(7, 16))
    assert ((cos * cos + sin * sin) - 1).abs().max() > 1e-3
    leaf = qkv.clone().requires_grad_(True)
    q, k, v, rq, rk = qkv_rope_forward_torch(leaf, cos, sin, v_extra, 4, 2, 1.2)
    torch.autograd.backward((q, k, v), grads)
    ours = qkv_rope_backward_torch(*grads, q.detach(), k.detach(), rq, rk, cos, sin, 1.2)
    torch.testing.assert_close(ours, leaf.grad, rtol=1e-5, atol=1e-5)


def test_outputs_are_new_tensors_even_for_a_single_token():
    """B = T = 1 (batch-1 decoding): v must still be a copy, never a view of the op's input."""
    qkv, _, cos, sin, _ = inputs(B=1, T=1, extra=False)
    q, k, v = qkv_rope(qkv, cos, sin, None, 4, 2, 1.2)
    assert v.data_ptr() != qkv.data_ptr() + 6 * 16 * qkv.element_size()
    torch.testing.assert_close(v.flatten(), qkv.flatten()[6 * 16 :])


def test_backward_takes_strided_gradients_like_flex_attention_gives():
    qkv, _, cos, sin, grads = inputs(extra=False)
    q, k, _, rq, rk = qkv_rope_op(qkv, cos, sin, None, 4, 2, 1.2)
    # (B, H, T, D) buffers seen as (B, T, H, D): FlexAttention's layout
    strided = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
    assert not strided[0].is_contiguous()
    a = qkv_rope_backward_torch(*grads, q, k, rq, rk, cos, sin, 1.2)
    b = qkv_rope_backward_torch(*strided, q, k, rq, rk, cos, sin, 1.2)
    assert torch.equal(a, b)
    # the rstds are those of the raw q and k heads
    D = 16
    torch.testing.assert_close(
        rq, qkv[..., : 4 * D].unflatten(-1, (4, D)).pow(2).mean(-1).add(1.1920928955078125e-07).rsqrt()
    )


def test_op_compiles_whole_and_refuses_double_backward():
    qkv, v_extra, cos, sin, grads = inputs()

    def f(qkv, v_extra):
        q, k, v = qkv_rope(qkv, cos, sin, v_extra, 4, 2, 1.2)
        return (q * grads[0]).sum() + (k * grads[1]).sum() + (v * grads[2]).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = qkv.clone().requires_grad_(True)
    b = qkv.clone().requires_grad_(True)
    f(a, v_extra).backward()
    compiled(b, v_extra).backward()
    torch.testing.assert_close(a.grad, b.grad)
    c = qkv.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(f(c, v_extra), c, create_graph=True)


TRITON_SCRIPT = textwrap.dedent("""
    import json, torch
    from chatlm.model.qkv_rope import qkv_rope_torch, rms_eps
    from chatlm.model.qkv_rope_triton import qkv_rope_bwd_triton, qkv_rope_fwd_triton
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for H, Hkv, extra in ((3, 3, True), (4, 2, False)):   # 3: heads padded to a power of two
            g = torch.Generator().manual_seed(H)
            B, T, D = 2, 5, 16
            qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 2).to(dtype)
            vx = torch.randn(B, T, Hkv, D, generator=g).to(dtype) if extra else None
            f = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
            ang = torch.arange(T).float()[:, None] * f
            cos, sin = ang.cos().to(dtype)[None, :, None], ang.sin().to(dtype)[None, :, None]
            grads = [torch.randn(B, h, T, D, generator=g).to(dtype).transpose(1, 2) for h in (H, Hkv, Hkv)]
            leaf = qkv.float().requires_grad_(True)
            ref = qkv_rope_torch(leaf, cos.float(), sin.float(), vx.float() if extra else None, H, Hkv, 1.2)
            torch.autograd.backward(ref, [x.float() for x in grads])
            q, k, v, rq, rk = qkv_rope_fwd_triton(qkv, cos, sin, vx, H, Hkv, 1.2, rms_eps(dtype))
            outs = (q, k, v)
            dqkv = qkv_rope_bwd_triton(*grads, q, k, rq, rk, cos, sin, 1.2)
            out[f"{dtype}_{H}_{Hkv}"] = {
                "fwd": max((o.float() - r).abs().max().item() for o, r in zip(outs, ref)),
                "fwd_scale": max(r.abs().max().item() for r in ref),
                "bwd": (dqkv.float() - leaf.grad).abs().max().item(),
                "bwd_scale": leaf.grad.abs().max().item(),
                "dtypes": all(o.dtype == dtype for o in outs) and dqkv.dtype == dtype,
                "contiguous": all(o.is_contiguous() for o in outs) and dqkv.is_contiguous(),
            }
    # one token at position 3 of a longer table (a decoding step): the tables are a slice
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(1, 1, 8 * 16, generator=g)
    f = 10000.0 ** (-torch.arange(0, 16, 2).float() / 16)
    ang = torch.arange(6).float()[:, None] * f
    cos, sin = ang.cos()[None, 3:4, None], ang.sin()[None, 3:4, None]
    grads = [torch.randn(1, 1, h, 16, generator=g) for h in (4, 2, 2)]
    leaf = qkv.clone().requires_grad_(True)
    ref = qkv_rope_torch(leaf, cos, sin, None, 4, 2, 1.2)
    torch.autograd.backward(ref, grads)
    q, k, v, rq, rk = qkv_rope_fwd_triton(qkv, cos, sin, None, 4, 2, 1.2, rms_eps(torch.float32))
    dqkv = qkv_rope_bwd_triton(*grads, q, k, rq, rk, cos, sin, 1.2)
    out["decode_step"] = {
        "fwd": max((o - r).abs().max().item() for o, r in zip((q, k, v), ref)),
        "fwd_scale": max(r.abs().max().item() for r in ref),
        "bwd": (dqkv - leaf.grad).abs().max().item(), "bwd_scale": leaf.grad.abs().max().item(),
        "dtypes": True, "contiguous": True,
    }
    print(json.dumps(out))
""")


def test_triton_kernels_in_the_interpreter_match_autograd(triton_interpreter):
    results = triton_interpreter(TRITON_SCRIPT)
    assert len(results) == 5
    for key, r in results.items():
        # bf16: inputs and outputs are rounded to 8 bits; fp32: only the order of operations differs
        tol = 2**-7 if "bfloat16" in key else 1e-5
        assert r["fwd"] <= tol * r["fwd_scale"], (key, r)
        assert r["bwd"] <= tol * r["bwd_scale"] * 2, (key, r)
        assert r["bwd_scale"] > 0.1 and r["dtypes"] and r["contiguous"], (key, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_the_gpu_match_autograd_at_d20_shape():
    pytest.importorskip("triton")
    from chatlm.model.qkv_rope import rms_eps
    from chatlm.model.qkv_rope_triton import qkv_rope_bwd_triton, qkv_rope_fwd_triton

    B, T, H, D = 4, 2048, 10, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", generator=g).bfloat16()
    vx = torch.randn(B, T, H, D, device="cuda", generator=g).bfloat16()
    cos, sin = (t.cuda() for t in rope_tables(T, D, torch.bfloat16))
    grads = [torch.randn(B, H, T, D, device="cuda", generator=g).bfloat16().transpose(1, 2) for _ in range(3)]
    leaf = qkv.float().requires_grad_(True)
    ref = qkv_rope_torch(leaf, cos.float(), sin.float(), vx.float(), H, H, 1.2)
    torch.autograd.backward(ref, [x.float() for x in grads])
    q, k, v, rq, rk = qkv_rope_fwd_triton(qkv, cos, sin, vx, H, H, 1.2, rms_eps(torch.bfloat16))
    outs = (q, k, v)
    dqkv = qkv_rope_bwd_triton(*grads, q, k, rq, rk, cos, sin, 1.2)
    for o, r in zip(outs, ref):
        assert ((o.float() - r).norm() / r.norm()).item() < 4e-3
    assert ((dqkv.float() - leaf.grad).norm() / leaf.grad.norm()).item() < 4e-3
