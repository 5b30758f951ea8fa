"""Routing of a GPT-shaped module's parameters into MuonAdamW groups (spec §2.1, §2.2)."""

import math

import pytest
import torch
from torch import nn

from chatlm.config import OptimConfig, OptimKind
from chatlm.optim import MuonAdamW, build_optimizer, build_param_groups

C, V, L, HKV = 32, 64, 2, 2


class FakeBlock(nn.Module):
    def __init__(self, has_ve):
        super().__init__()
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.c_fc = nn.Linear(C, 4 * C, bias=False)
        self.mlp_proj = nn.Linear(4 * C, C, bias=False)
        self.ve_gate = nn.Linear(12, HKV, bias=False) if has_ve else None


class FakeGPT(nn.Module):
    """Only the attribute names and shapes of the real GPT matter here."""

    def __init__(self, value_embeds=True, smear=True, backout=True):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.value_embeds = nn.ModuleDict({"1": nn.Embedding(V, C)}) if value_embeds else None
        self.blocks = nn.ModuleList([FakeBlock(has_ve=value_embeds and i == 1) for i in range(L)])
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if smear:
            self.smear_gate = nn.Linear(24, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        if backout:
            self.backout_lambda = nn.Parameter(torch.tensor(0.2))


def test_routing_order_and_hyperparameters():
    model, cfg = FakeGPT(), OptimConfig()
    groups = build_param_groups(model, cfg, model_dim=C, batch_lr_scale=2.0)
    names = [g["name"] for g in groups]
    assert names == [
        "lm_head",
        "wte",
        "value_embeds",
        "resid_lambdas",
        "x0_lambdas",
        "gates",
        "muon_2x12",
        "muon_32x32",
        "muon_32x128",
        "muon_128x32",
    ]
    by = {g["name"]: g for g in groups}
    dms = (C / 768) ** -0.5
    assert by["lm_head"]["lr"] == pytest.approx(0.008 * dms * 2)
    assert by["wte"]["lr"] == pytest.approx(0.3 * dms * 2)
    assert by["value_embeds"]["lr"] == pytest.approx(0.5 * 0.3 * dms * 2)
    assert by["resid_lambdas"]["lr"] == pytest.approx(0.005 * 2)
    assert by["x0_lambdas"]["lr"] == pytest.approx(0.5 * 2)
    assert by["gates"]["lr"] == 0.2  # fixed: no batch or width scaling
    assert {g["betas"] for g in groups if g["kind"] == "adamw"} >= {(0.8, 0.96), (0.8, 0.995), (0.96, 0.95)}
    assert [by[n]["weight_decay"] for n in names[:6]] == [0.01, 0.001, 0.01, 0.05, 0.0, 0.0]
    assert by["x0_lambdas"]["betas"] == (0.96, 0.95)
    for g in groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert g["lr"] == pytest.approx(0.02 * 2) and g["momentum"] == 0.97 and g["weight_decay"] == 0.28
            assert g["beta2"] == 0.9 and g["ns_steps"] == 5
    assert len(by["muon_32x32"]["params"]) == 4 * L and len(by["muon_2x12"]["params"]) == 1
    assert len(by["gates"]["params"]) == 3
    assert by["lm_head"]["params"][0] is model.lm_head.weight
    routed = [p for g in groups for p in g["params"]]
    assert len(routed) == len(list(model.parameters()))


def test_optional_features_and_errors():
    groups = build_param_groups(
        FakeGPT(value_embeds=False, smear=False, backout=False), OptimConfig(), C, 1.0, muon_weight_decay=0.06
    )
    assert [g["name"] for g in groups][:4] == ["lm_head", "wte", "resid_lambdas", "x0_lambdas"]
    assert all(g["weight_decay"] == 0.06 for g in groups if g["kind"] == "muon")
    model = FakeGPT()
    model.stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="stray"):
        build_param_groups(model, OptimConfig(), C, 1.0)
    model = FakeGPT()
    model.blocks[0].norm_weight = nn.Parameter(torch.ones(C))
    with pytest.raises(ValueError, match="2-D"):
        build_param_groups(model, OptimConfig(), C, 1.0)


def test_adamw_kind_routes_matrices_to_adamw():
    cfg = OptimConfig(kind=OptimKind.adamw)
    groups = build_param_groups(FakeGPT(), cfg, C, 1.0)
    assert all(g["kind"] == "adamw" for g in groups)
    mats = groups[-1]
    assert mats["name"] == "matrices" and mats["lr"] == 0.02 and mats["weight_decay"] == 0.28
    assert len(mats["params"]) == 6 * L + 1


@pytest.mark.parametrize("kind", [OptimKind.muon_adamw, OptimKind.adamw])
def test_built_optimizer_trains(kind):
    torch.manual_seed(0)
    model = FakeGPT()
    opt = build_optimizer(model, OptimConfig(kind=kind), C, 1.0)
    assert isinstance(opt, MuonAdamW)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = sum(((p.float() + 1) ** 2).sum() * (i + 1) for i, p in enumerate(model.parameters()))
    loss.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    assert all(math.isfinite(p.detach().abs().max().item()) for p in model.parameters())
