"""One matmul for q, k and v instead of three: what it saves on the GPU, measured alone.

    usage (device tool): python3 launch/gpu/qkv_fusion.py [$OUT/qkv_fusion.json]

The timed function is the attention input projection as chatlm trains it: fp32 master weights
cast to bf16 at each call, forward and backward (gradients of x and of the three weights), under
torch.compile, at d20's (1280 channels, 32 x 2048 tokens) and d24's (1536, 16 x 2048) shapes.

  separate   three F.linear calls (c_q, c_k, c_v), as nanochat writes it; the backward sums three
             (tokens x C) input gradients
  fused      the three weights concatenated at each call (a 3C x C copy, tiny) and one F.linear
             into q|k|v, split by views; one input-gradient matmul with K = 3C

The parameters and the optimizer do not change, only the matmul shapes. Prints median fwd+bwd
times (20 calls after 5), the difference of every output and gradient between the two, and the
longest kernels of one call.
"""

import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "src")
from chatlm.bench.profile import top_kernels  # noqa: E402
from chatlm.bench.timing import median, time_calls  # noqa: E402

SHAPES = [("d20", 1280, 32), ("d24", 1536, 16)]  # (model, channels, device batch); T = 2048
dev = torch.device("cuda")


def separate(x, wq, wk, wv):
    return F.linear(x, wq.to(x.dtype)), F.linear(x, wk.to(x.dtype)), F.linear(x, wv.to(x.dtype))


def fused(x, wq, wk, wv):
    qkv = F.linear(x, torch.cat([wq, wk, wv]).to(x.dtype))
    return qkv.split([wq.size(0), wk.size(0), wv.size(0)], dim=-1)


def run_shape(model: str, C: int, B: int) -> dict:
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(C, C, device=dev) * C**-0.5) for _ in range(3)]
    x = torch.randn(B, 2048, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gys = [torch.randn(B, 2048, C, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    result: dict = {"model": model, "channels": C, "tokens": B * 2048, "variants": {}}
    outs = {}
    for name, f in (("separate", separate), ("fused", fused)):
        torch._dynamo.reset()
        fn = torch.compile(f)

        def step():
            x.grad = None
            for w in ws:
                w.grad = None
            ys = fn(x, *ws)
            torch.autograd.backward(ys, gys)
            return ys

        ys = step()
        outs[name] = [y.detach().float() for y in ys] + [x.grad.float()] + [w.grad.clone() for w in ws]
        ms = 1000 * median(time_calls(step, 20, 5, dev))
        result["variants"][name] = {"ms": round(ms, 3), "kernels": top_kernels(step, n=8)}
        print(f"{model} {name:8s} fwd+bwd {ms:7.3f} ms", flush=True)
        for k in result["variants"][name]["kernels"]:
            print(f"    {k['ms']:7.3f} ms  x{k['calls']}  {k['kernel']}", flush=True)
    names = ["q", "k", "v", "dx", "dwq", "dwk", "dwv"]
    result["max_rel_diff"] = {
        n: (a - b).abs().max().item() / b.abs().max().item() for n, a, b in zip(names, outs["fused"], outs["separate"])
    }
    print(
        f"{model} fused vs separate, max |diff| / max |value|:",
        {k: f"{v:.1e}" for k, v in result["max_rel_diff"].items()},
        flush=True,
    )
    return result


def main() -> None:
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shapes": [run_shape(*s) for s in SHAPES],
    }
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
