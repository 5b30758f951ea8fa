"""Single-process MuonAdamW steps against straightforward references."""

import math

import pytest
import torch

from chatlm.optim import MuonAdamW, adamw_update, muon_update

# Written out again from the spec (§2.4) so the test does not share the optimizer's constant.
COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def reference_muon_step(p, g, buf, s, lr, mu, wd, beta2, row_eq=True, plus=True, cautious=True):
    """One Muon step on one matrix, a line per sentence of the spec. Returns (p, buf, s)."""
    rows, cols = p.shape
    buf = mu * buf + (1 - mu) * g  # 1. momentum
    u = (1 - mu) * g + mu * buf  #    Nesterov-style look-ahead
    if row_eq:  # 3. MuonEq
        row_norms = torch.clamp(u.norm(dim=1, keepdim=True), min=1e-6)
        u = u / row_norms * (u.norm() / math.sqrt(rows))
    x = u / (1.01 * u.norm() + 1e-6)  # 4. Polar Express
    for a, b, c in COEFFS:
        if rows <= cols:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        else:
            A = x.T @ x
            x = a * x + x @ (b * A + c * A @ A)
    if plus:  # 5. Muon+
        x = x * math.sqrt(min(rows, cols)) / x.norm()
    v_mean = (x**2).mean(dim=1, keepdim=True) if rows >= cols else (x**2).mean(dim=0, keepdim=True)
    s = beta2 * s + (1 - beta2) * v_mean  # 6. NorMuon
    y = x / torch.sqrt(torch.clamp(s, min=1e-10))
    y = y * (x.norm() / y.norm())
    lr_eff = lr * math.sqrt(max(1.0, rows / cols))  # 7. cautious WD + update
    mask = (y * p >= 0).float() if cautious else torch.ones_like(p)
    p = p - lr_eff * y - lr_eff * wd * p * mask
    return p, buf, s


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(12, 4), (4, 12), (8, 8)])
@pytest.mark.parametrize("flags", [(True, True, True), (False, False, False)])
def test_muon_matches_reference(shape, flags):
    row_eq, plus, cautious = flags
    k = 3
    params = [torch.nn.Parameter(_randn(shape, i)) for i in range(k)]
    opt = MuonAdamW(
        [
            {
                "kind": "muon",
                "params": params,
                "lr": 0.02,
                "momentum": 0.9,
                "weight_decay": 0.2,
                "beta2": 0.9,
                "row_equalize": row_eq,
                "muon_plus": plus,
                "cautious_wd": cautious,
            }
        ]
    )
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros(shape) for _ in range(k)]
    second = [torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1])) for _ in range(k)]
    for step, mu in enumerate([0.85, 0.9, 0.95]):
        opt.param_groups[0]["momentum"] = mu
        for i, p in enumerate(params):
            p.grad = _randn(shape, 100 * step + i)
            ref[i], bufs[i], second[i] = reference_muon_step(
                ref[i], p.grad, bufs[i], second[i], 0.02, mu, 0.2, 0.9, row_eq, plus, cautious
            )
        opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    state = opt.state[params[0]]
    assert state["momentum_buffer"].shape == (k, *shape)
    expected = (k, shape[0], 1) if shape[0] >= shape[1] else (k, 1, shape[1])
    assert state["second_momentum_buffer"].shape == expected


def test_muon_bf16_compute_is_close_to_fp32():
    shape, k = (16, 8), 2
    results = []
    for dtype in (None, torch.bfloat16):
        params = [torch.nn.Parameter(_randn(shape, i)) for i in range(k)]
        opt = MuonAdamW(
            [{"kind": "muon", "params": params, "lr": 0.02, "momentum": 0.95, "weight_decay": 0.0}], compute_dtype=dtype
        )
        for p in params:
            p.grad = _randn(shape, 7)
        before = [p.detach().clone() for p in params]
        opt.step()
        results.append([p.detach() - b for p, b in zip(params, before)])
    for full, half in zip(*results):
        assert full.abs().max() > 0
        torch.testing.assert_close(half, full, rtol=0.05, atol=2e-3)


def _adamw_pair(dtype=torch.float32):
    shapes = [(10, 6), (6,), ()]
    ours = [torch.nn.Parameter(_randn(s, i).to(dtype)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(_randn(s, i)) for i, s in enumerate(shapes)]
    return ours, theirs


@pytest.mark.parametrize("betas,eps,wd", [((0.8, 0.95), 1e-10, 0.05), ((0.9, 0.999), 1e-8, 0.0)])
def test_adamw_matches_torch(betas, eps, wd):
    ours, theirs = _adamw_pair()
    opt = MuonAdamW([{"kind": "adamw", "params": ours, "lr": 0.01, "betas": betas, "eps": eps, "weight_decay": wd}])
    ref = torch.optim.AdamW(theirs, lr=0.01, betas=betas, eps=eps, weight_decay=wd)
    for step in range(5):
        lr = 0.01 * (step + 1) / 5  # the loop changes lr every step
        opt.param_groups[0]["lr"] = lr
        ref.param_groups[0]["lr"] = lr
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if step == 0 and i == 1:  # a missing grad: skipped, its own step count lags behind
                a.grad = b.grad = None
                continue
            a.grad = _randn(a.shape, 50 * step + i)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)
    assert opt.state[ours[0]]["step"] == 5 and opt.state[ours[1]]["step"] == 4


def test_adamw_bf16_params_keep_bf16_state():
    ours, theirs = _adamw_pair(torch.bfloat16)
    opt = MuonAdamW(
        [{"kind": "adamw", "params": ours, "lr": 0.01, "betas": (0.8, 0.995), "eps": 1e-10, "weight_decay": 0.001}]
    )
    ref = torch.optim.AdamW(theirs, lr=0.01, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001)
    for step in range(3):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            b.grad = _randn(a.shape, 10 * step + i)
            a.grad = b.grad.to(torch.bfloat16)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and opt.state[a]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(a.detach().float(), b.detach(), rtol=2e-2, atol=2e-2)


def test_update_functions_accept_tensor_hyperparameters():
    """The compile path passes 0-D CPU tensors instead of floats; results must not change."""

    def t(x):
        return torch.tensor(x, dtype=torch.float32)

    p, g = _randn((6, 4), 0), _randn((6, 4), 1)
    outs = []
    for conv in (float, t):
        pp, m, v = p.clone(), torch.zeros(6, 4), torch.zeros(6, 4)
        adamw_update(pp, g, m, v, conv(0.01), conv(0.8), conv(0.95), conv(1e-10), conv(0.1), conv(0.2), conv(0.05))
        pm, buf, s = p.clone()[None], torch.zeros(1, 6, 4), torch.zeros(1, 6, 1)
        muon_update(pm, g[None], buf, s, conv(0.02), conv(0.95), conv(0.1), conv(0.9))
        outs.append((pp, pm))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_mixed_groups_and_validation():
    a = torch.nn.Parameter(_randn((4, 4), 0))
    b = torch.nn.Parameter(_randn((4, 8), 1))
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([{"kind": "muon", "params": [a, b], "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([{"params": [a], "lr": 0.1}])
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([{"kind": "adamw", "params": [a], "lr": 0.1}])
    opt = MuonAdamW(
        [
            {"kind": "adamw", "params": [b], "lr": 0.1, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0},
            {"kind": "muon", "params": [a], "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        ]
    )
    assert opt.param_groups[1]["ns_steps"] == 5 and opt.param_groups[1]["initial_lr"] == 0.1
    opt.set_hyperparameters(0.5, muon_momentum=0.97, muon_weight_decay=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    assert opt.param_groups[1]["momentum"] == 0.97 and opt.param_groups[1]["weight_decay"] == 0.01
    assert opt.param_groups[0]["weight_decay"] == 0.0
    a.grad, b.grad = torch.ones(4, 4), torch.ones(4, 8)
    before = a.detach().clone(), b.detach().clone()
    opt.step()
    assert not torch.equal(a.detach(), before[0]) and not torch.equal(b.detach(), before[1])
    sd = opt.state_dict()  # the plain torch state dict still works (tied to the world size)
    opt.load_state_dict(sd)


def test_full_state_dict_round_trip_single_process():
    def make():
        ps = [torch.nn.Parameter(_randn((40, 30), 0)), torch.nn.Parameter(_randn((5,), 1))]
        ms = [torch.nn.Parameter(_randn((6, 4), 2 + i)) for i in range(3)]
        return ps + ms, MuonAdamW(
            [
                {"kind": "adamw", "params": ps, "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.1},
                {"kind": "muon", "params": ms, "lr": 0.02, "momentum": 0.95, "weight_decay": 0.1},
            ]
        )

    def step(params, opt, seed):
        for i, p in enumerate(params):
            p.grad = _randn(p.shape, seed + i)
        opt.step()

    params, opt = make()
    step(params, opt, 0)
    sd = opt.full_state_dict()
    assert sd["state"][1][0]["momentum_buffer"].shape == (3, 6, 4)
    params2, opt2 = make()
    for p, q in zip(params2, params):
        p.data.copy_(q.data)
    opt2.param_groups[0]["lr"] = 123.0  # restored from the saved groups
    opt2.load_full_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.01
    step(params, opt, 10)
    step(params2, opt2, 10)
    for p, q in zip(params, params2):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    bad = make()[1]
    bad.param_groups[1]["params"] = bad.param_groups[1]["params"][:2]
    with pytest.raises(ValueError, match="does not match"):
        bad.load_full_state_dict(sd)
