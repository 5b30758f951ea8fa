"""[H] decode attention variants on one GPU: one query per (sequence, head) against a cached span,
d20 shape (10 heads of 128), bf16, each variant captured in a CUDA graph of 20 calls so launch
overhead does not count. Prints one JSON line: microseconds per call and the max error against an
fp32 reference, per (variant, batch)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from chatlm.model.attention import single_query_attention

dev, dt = torch.device("cuda"), torch.bfloat16
H, D, S = 10, 128, 768


def bmm_kq(q, k, v, bias):  # scores as K @ q: the keys matrix on the left
    n = q.size(0)
    qb = q.reshape(n * H, D, 1)
    s = torch.bmm(k.reshape(n * H, S, D), qb, out_dtype=torch.float32).view(n, H, 1, S)
    p = torch.add(bias, s, alpha=D**-0.5).softmax(-1).to(dt)
    return torch.bmm(v.reshape(n * H, S, D).transpose(1, 2), p.view(n * H, S, 1)).view(n, 1, H, D)


def mulsum(q, k, v, bias):  # elementwise product and reductions, no GEMM
    s = (k * q.transpose(1, 2)).float().sum(-1).unsqueeze(2)  # (n, H, 1, S)
    p = torch.add(bias, s, alpha=D**-0.5).softmax(-1).to(dt)
    return (p.transpose(2, 3) * v).float().sum(2).to(dt).unsqueeze(1)


def sdpa(backend):
    def run(q, k, v, bias):
        with torch.nn.attention.sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=bias.to(dt)).transpose(1, 2)

    return run


VARIANTS = {
    "bmm_qk (current)": single_query_attention,
    "bmm_kq": bmm_kq,
    "mulsum": mulsum,
    "sdpa_efficient": sdpa(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_cudnn": sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
    "sdpa_math": sdpa(torch.nn.attention.SDPBackend.MATH),
}

rows = []
for n in (1, 8, 32):
    g = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(n, 1, H, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(n, H, S, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(n, H, S, D, device=dev, dtype=dt, generator=g)
    pos = torch.randint(S // 2, S, (n,), device=dev, generator=g)
    hidden = torch.arange(S, device=dev) > pos[:, None, None, None]
    bias = torch.zeros(n, 1, 1, S, device=dev).masked_fill(hidden, float("-inf"))
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float(), v.float(), attn_mask=bias)
    ref = ref.transpose(1, 2)
    for name, fn in VARIANTS.items():
        try:
            out = fn(q, k, v, bias)
            err = float((out.float() - ref).abs().max())
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn(q, k, v, bias)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    fn(q, k, v, bias)
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            us = start.elapsed_time(end) * 1000 / 200
            rows.append({"variant": name, "batch": n, "us_per_call": round(us, 2), "max_err": err})
        except Exception as exc:  # a backend that refuses these shapes
            rows.append({"variant": name, "batch": n, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
for r in rows:
    print(r)
print(json.dumps(rows))
