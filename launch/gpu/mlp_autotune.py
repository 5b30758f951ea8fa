"""Can Inductor's GEMM autotuning fuse ReLU^2 into the MLP matmuls? One MLP sub-block, timed.

    usage (device tool): python3 launch/gpu/mlp_autotune.py [$OUT/mlp_autotune.json]

The timed function is the MLP half of a transformer block as chatlm trains it,
`x + c_proj(relu(c_fc(rms_norm(x)))^2)`, forward and backward, with fp32 master weights cast to
bf16 at each call, at d20's (1280 channels, 32 x 2048 tokens) and d24's (1536, 16 x 2048) shapes.
Each compile setting is a fresh torch.compile of the same function:

  default      torch.compile's default (cuBLAS matmuls, ReLU^2 in separate Triton kernels)
  gemm         max_autotune_gemm: Inductor times its Triton matmul templates, which can take the
               pointwise epilogue, against cuBLAS for every matmul and keeps the faster
  gemm_tma     the same plus the persistent TMA templates (Hopper)

For each it prints the compile time, the median fwd+bwd time (20 calls after 5), the largest
difference of the output and gradients from `default`, and the ten longest kernels of one call,
which show whether a fused `triton_tem_fused_mm_relu...` kernel replaced the separate pass.
"""

import json
import sys
import time

import torch

sys.path.insert(0, "src")
from chatlm.bench.profile import top_kernels  # noqa: E402
from chatlm.bench.timing import median, time_calls  # noqa: E402
from chatlm.model.gpt import MLP, norm  # noqa: E402

SETTINGS = {
    "default": {},
    "gemm": {"max_autotune_gemm": True},
    "gemm_tma": {"max_autotune_gemm": True, "triton.enable_persistent_tma_matmul": True},
}
SHAPES = [("d20", 1280, 32), ("d24", 1536, 16)]  # (model, channels, device batch); T = 2048
dev = torch.device("cuda")


def sub_block(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return x + mlp(norm(x))


def run_shape(model: str, C: int, B: int) -> dict:
    torch.manual_seed(0)
    mlp = MLP(C, device=dev)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=C**-0.5)
    x0 = torch.randn(B, 2048, C, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x0)
    result: dict = {"model": model, "channels": C, "tokens": B * 2048, "settings": {}}
    reference = None
    for name, options in SETTINGS.items():
        torch._dynamo.reset()
        fn = torch.compile(sub_block, options=options or None)
        x = x0.clone().requires_grad_(True)

        def step():
            for p in mlp.parameters():
                p.grad = None
            x.grad = None
            y = fn(mlp, x)
            y.backward(dy)
            return y

        t0 = time.perf_counter()
        y = step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        grads = [x.grad.float().clone()] + [p.grad.float().clone() for p in mlp.parameters()]
        outs = [y.detach().float()] + grads
        if reference is None:
            reference = outs
        diffs = [(a - b).abs().max().item() for a, b in zip(outs, reference)]
        scale = [b.abs().max().item() for b in reference]
        ms = 1000 * median(time_calls(step, 20, 5, dev))
        entry = {
            "compile_s": round(compile_s, 1),
            "ms": round(ms, 3),
            "max_rel_diff_vs_default": max(d / s for d, s in zip(diffs, scale)),
            "kernels": top_kernels(step),
        }
        result["settings"][name] = entry
        print(
            f"{model} {name:9s} compile {compile_s:6.1f} s  fwd+bwd {ms:8.3f} ms  "
            f"max rel diff {entry['max_rel_diff_vs_default']:.2e}",
            flush=True,
        )
        for k in entry["kernels"]:
            print(f"    {k['ms']:8.3f} ms  x{k['calls']}  {k['kernel']}", flush=True)
    return result


def main() -> None:
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for model, C, B in SHAPES:
        out["shapes"].append(run_shape(model, C, B))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
