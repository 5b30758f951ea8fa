"""The GPT on tiny shapes: init, dtypes, loss, KV-cache decoding and a few training steps."""

import math
import warnings

import pytest
import torch

from chatlm.config import ConfigError, ModelConfig
from chatlm.model import GPT
from chatlm.model.gpt import apply_rotary

VOCAB = 100  # padded to 128: exercises the slice back to V


def tiny_config(**kw) -> ModelConfig:
    base = dict(name="tiny", depth=4, aspect_ratio=32, head_dim=32, n_kv_head=2, sequence_len=32, short_window=8)
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg=None, dtype=torch.float32, backend="sdpa", seed=0) -> GPT:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(cfg or tiny_config(), VOCAB, compute_dtype=dtype, attention_backend=backend)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def perturb(model: GPT, seed=1) -> GPT:
    """Move off the init point so every path (zero projections, smear, backout) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
    return model


def test_structure_and_dtypes():
    model = make_model(dtype=torch.bfloat16)
    d = model.dims
    assert (d.n_embd, d.n_head, d.n_kv_head, d.padded_vocab_size) == (128, 4, 2, 128)
    assert len(model.blocks) == 4 and sorted(model.value_embeds) == ["1", "3"]
    assert [b.attn.window for b in model.blocks] == [8, 8, 8, 32]
    assert model.wte.weight.dtype == torch.bfloat16 and model.value_embeds["1"].weight.dtype == torch.bfloat16
    assert model.value_embeds["1"].weight.shape == (128, 2 * 32)
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32
    assert model.blocks[0].attn.ve_gate is None and model.blocks[1].attn.ve_gate.weight.shape == (2, 12)
    assert model.blocks[1].attn.c_k.weight.shape == (64, 128) and model.blocks[1].mlp.c_fc.weight.shape == (512, 128)
    assert model.smear_gate.weight.shape == (1, 24) and model.smear_lambda.shape == ()
    assert model.resid_lambdas.shape == (4,) and model.x0_lambdas.shape == (4,)
    assert model.cos.shape == (1, 320, 1, 16) and model.cos.dtype == torch.bfloat16
    assert all(b.bias is None for b in model.modules() if isinstance(b, torch.nn.Linear))
    fp16 = make_model(dtype=torch.float16)
    assert fp16.wte.weight.dtype == torch.float32 and fp16.value_embeds["3"].weight.dtype == torch.float32
    assert "cos" not in model.state_dict()  # derived buffers are not checkpointed
    for bad in ("auto", "fa3"):
        with pytest.raises(ConfigError) as err:
            model.attention_backend = bad
        assert err.value.key == "model.attention_backend"
    assert model.attention_backend == "sdpa"


def test_init_statistics():
    cfg = tiny_config(depth=3, aspect_ratio=40, sequence_len=16)  # 120 -> C = 128
    model = make_model(cfg)
    C = 128
    s = math.sqrt(3) / math.sqrt(C)
    assert model.wte.weight.std().item() == pytest.approx(0.8, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    for blk in model.blocks:
        q = blk.attn.c_q.weight
        assert q.abs().max().item() <= s and q.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.05)
        assert blk.mlp.c_fc.weight.abs().max().item() <= 0.4 * s
        assert blk.mlp.c_fc.weight.abs().max().item() > 0.39 * s
        assert blk.attn.c_proj.weight.count_nonzero().item() == 0
        assert blk.mlp.c_proj.weight.count_nonzero().item() == 0
    for key in ("0", "2"):
        gate = model.blocks[int(key)].attn.ve_gate.weight
        assert gate.min().item() >= 0 and gate.max().item() <= 0.02
        assert model.value_embeds[key].weight.abs().max().item() <= s
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.125, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    sg = model.smear_gate.weight
    assert sg.min().item() >= 0 and 0 < sg.max().item() <= 0.02
    # RoPE tables: base 1e5, channel j has frequency base^(-2j/D)
    t, j, D = 5, 3, 32
    assert model.cos[0, t, 0, j].item() == pytest.approx(math.cos(t * 100000.0 ** (-2 * j / D)), abs=1e-6)
    assert model.sin[0, t, 0, j].item() == pytest.approx(math.sin(t * 100000.0 ** (-2 * j / D)), abs=1e-6)


def test_rotary_half_split_convention():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos = torch.tensor([0.5, 0.25]).view(1, 1, 1, 2)
    sin = torch.tensor([0.1, 0.2]).view(1, 1, 1, 2)
    y = apply_rotary(x, cos, sin).flatten().tolist()
    # (x1 cos + x2 sin, -x1 sin + x2 cos) with x1 = (1, 2), x2 = (3, 4)
    assert y == pytest.approx([1 * 0.5 + 3 * 0.1, 2 * 0.25 + 4 * 0.2, -1 * 0.1 + 3 * 0.5, -2 * 0.2 + 4 * 0.25])


def test_forward_shapes_softcap_and_loss_reductions():
    model = perturb(make_model())
    idx = torch.randint(0, VOCAB, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    targets = torch.randint(0, VOCAB, (2, 16))
    targets[0, :5] = -1
    per_tok = model(idx, targets, loss_reduction="none")
    assert per_tok.shape == (32,) and per_tok[:5].eq(0).all() and per_tok[5:].gt(0).all()
    mean = model(idx, targets)
    assert mean.item() == pytest.approx(per_tok.sum().item() / 27, rel=1e-5)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1)
    assert mean.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    assert model(idx).abs().max().item() <= 15.0
    model.config.softcap = 0.0
    assert model(idx).abs().max().item() > 15.0


def test_loss_at_init_is_ln_vocab_and_training_overfits():
    model = make_model()
    idx = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    loss0 = model(x, y)
    assert loss0.item() == pytest.approx(math.log(VOCAB), abs=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(25):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final = model(x, y).item()
    assert final < loss0.item() - 1.0
    # every parameter gets a gradient (zero-init projections included)
    assert all(p.grad is not None for p in model.parameters())


def _greedy_matches_full_forward(model: GPT, prompt: torch.Tensor, steps=8, lengths=None):
    """Prefill the engine's cache with the rows of `prompt` (row b cut to lengths[b]), then decode
    greedily; every step's logits must equal a full re-forward of the row's sequence."""
    from chatlm.engine.kv_cache import DecodeView, PrefillView, SlotCache

    B = prompt.size(0)
    lengths = lengths or [prompt.size(1)] * B
    cache = SlotCache(model, B, model.dims.sequence_len)
    seqs = [prompt[b, : lengths[b]].tolist() for b in range(B)]
    with torch.no_grad():
        view = PrefillView(cache, list(range(B)), lengths)
        logits = model(prompt, kv_cache=view)
        assert cache.pos.tolist() == lengths
        last = logits[torch.arange(B), torch.tensor(lengths) - 1]
        for b in range(B):
            torch.testing.assert_close(last[b], model(torch.tensor([seqs[b]]))[0, -1], atol=1e-4, rtol=1e-4)
        cache.active[:] = True
        for _ in range(steps):
            nxt = last.argmax(-1)
            for b in range(B):
                seqs[b].append(int(nxt[b]))
            out = model(nxt.view(B, 1), kv_cache=DecodeView(cache, B, cache.max_len))
            assert out.shape == (B, 1, VOCAB)
            last = out[:, 0]
            for b in range(B):
                torch.testing.assert_close(last[b], model(torch.tensor([seqs[b]]))[0, -1], atol=1e-4, rtol=1e-4)
    return seqs


@pytest.mark.parametrize("backend,kernels", [("sdpa", "plain"), ("flex", "plain"), ("sdpa", "fused")])
def test_kv_cache_greedy_decoding_reproduces_full_forward(backend, kernels):
    # kernels=fused: the one q|k|v matmul and the qkv_rope op (its PyTorch path here) in prefill
    cfg = tiny_config(qkv_matmul=kernels if kernels == "fused" else "separate", rope_kernel=kernels)
    model = perturb(make_model(cfg, backend=backend)).eval()
    assert model.blocks[0].attn.fused_prologue(torch.zeros(1)) == (kernels == "fused")
    if backend == "flex":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.no_grad():  # eager flex on CPU has no backward
                    model(torch.zeros(1, 4, dtype=torch.long))
            except Exception as e:  # flex cannot run on this CPU build
                pytest.skip(f"flex not runnable here: {e}")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, 13), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seqs = _greedy_matches_full_forward(model, prompt, steps=10)  # crosses the window of 8
        assert [len(s) for s in seqs] == [23, 23]
        # rows of different lengths in one prefill (right-padded), then decoding at different positions
        ragged = _greedy_matches_full_forward(model, prompt, steps=6, lengths=[13, 4])
        assert ragged[0] == seqs[0][:19]
        # batch 1: every decoding step is a single token (B * T = 1)
        one = _greedy_matches_full_forward(model, prompt[:1], steps=3)
        assert one[0] == seqs[0][:16]


def test_smear_and_backout_change_the_output():
    model = perturb(make_model()).eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    base = model(idx)
    with torch.no_grad():
        model.smear_lambda.zero_()
    no_smear = model(idx)
    # position 0 has no previous token, so smear cannot touch it; later positions change
    torch.testing.assert_close(no_smear[:, 0], base[:, 0])
    assert (no_smear[:, 1:] - base[:, 1:]).abs().max().item() > 1e-3
    with torch.no_grad():
        model.backout_lambda.zero_()
    assert (model(idx) - no_smear).abs().max().item() > 1e-3


def test_bf16_forward_close_to_fp32_and_disabled_features():
    m32 = perturb(make_model())
    m16 = make_model(dtype=torch.bfloat16)
    with torch.no_grad():
        for p16, p32 in zip(m16.parameters(), m32.parameters()):
            p16.copy_(p32.to(p16.dtype))
    idx = torch.randint(0, VOCAB, (2, 16))
    l32, l16 = m32(idx), m16(idx)
    assert l16.dtype == torch.float32
    assert (l16 - l32).abs().max().item() < 0.15 and (l16 - l32).abs().mean().item() < 0.03
    plain = make_model(tiny_config(smear=False, backout=False, value_embeds=False))
    assert plain.smear_gate is None and plain.backout_lambda is None and len(plain.value_embeds) == 0
    assert plain.num_params()["scalars"] == 8 and plain.num_params()["value_embeds"] == 0
    assert plain(idx).shape == (2, 16, VOCAB)


def test_num_params_tiny():
    model = make_model()
    c = model.num_params()
    C, L, Vp, kv = 128, 4, 128, 64
    per_block = C * C * 2 + 2 * C * kv + 8 * C * C
    assert c["transformer_matrices"] == L * per_block + 2 * 12 * 2
    assert c["wte"] == c["lm_head"] == Vp * C and c["value_embeds"] == 2 * Vp * kv
    assert c["scalars"] == 2 * L + 24 + 2
    assert c["total"] == sum(p.numel() for p in model.parameters())
    assert model.num_scaling_params() == c["transformer_matrices"] + c["lm_head"]
    attn = 12 * 4 * 32 * (3 * 8 + 32)
    assert model.flops_per_token() == 6 * (c["transformer_matrices"] + c["lm_head"] + 24) + attn


def test_checkpoint_roundtrip_through_meta():
    """meta -> to_empty -> init_rotary -> load_state_dict reproduces the model exactly."""
    src = perturb(make_model(dtype=torch.bfloat16))
    with torch.device("meta"):
        dst = GPT(tiny_config(), VOCAB, compute_dtype=torch.bfloat16)
    dst.to_empty(device="cpu")
    dst.init_rotary()
    dst.load_state_dict(src.state_dict())
    idx = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(dst(idx), src(idx))


def loss_and_grads(model: GPT, idx: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("qkv_matmul,rope_kernel", [("fused", "plain"), ("fused", "fused"), ("separate", "fused")])
def test_kernel_choices_compute_nanochat_function(qkv_matmul, rope_kernel):
    """One q|k|v matmul, and RoPE + QK-norm as the qkv_rope op (its PyTorch path on CPU), give
    nanochat's loss and gradients (fp32, so only summation order differs); the fused matmul really
    skips the three Linears, and the op is really used (it needs the fused matmul)."""
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = perturb(make_model(tiny_config(qkv_matmul="separate", rope_kernel="plain")))
    new = perturb(make_model(tiny_config(qkv_matmul=qkv_matmul, rope_kernel=rope_kernel)))
    calls = []
    for block in new.blocks:
        block.attn.c_q.register_forward_hook(lambda *a: calls.append(1))
    x = torch.zeros(1, 1, 128)
    assert new.blocks[0].attn.fused_prologue(x) == (qkv_matmul == "fused" and rope_kernel == "fused")
    assert not ref.blocks[0].attn.fused_prologue(x)
    l_ref, g_ref = loss_and_grads(ref, idx)
    l_new, g_new = loss_and_grads(new, idx)
    assert len(calls) == (0 if qkv_matmul == "fused" else len(new.blocks))
    assert l_new == pytest.approx(l_ref, rel=1e-6)
    assert g_new.keys() == g_ref.keys() and len(g_ref) == len(list(ref.parameters()))
    for name, g in g_ref.items():
        err = (g_new[name] - g).abs().max().item()
        assert err <= 1e-5 * max(g.abs().max().item(), 1e-6), name
    # the RoPE tables really matter here: without rotation the loss moves
    flat = perturb(make_model(tiny_config(qkv_matmul=qkv_matmul, rope_kernel=rope_kernel)))
    flat.cos.fill_(1.0)
    flat.sin.zero_()
    assert abs(flat(idx, targets=torch.roll(idx, -1, dims=1)).item() - l_ref) > 1e-4


def test_fused_qkv_falls_back_for_other_linears():
    """A c_q that is not chatlm's plain Linear (e.g. fp8's Float8Linear) keeps three matmuls."""
    model = perturb(make_model())
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 128)
    fused = attn.project_qkv(x)
    other = torch.nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        other.weight.copy_(attn.c_q.weight)
    attn.c_q, calls = other, []
    other.register_forward_hook(lambda *a: calls.append(1))
    separate = attn.project_qkv(x)
    assert len(calls) == 1
    for a, b in zip(fused, separate):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
