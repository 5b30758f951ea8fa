"""The fused loss kernel on the GPU: correctness against the PyTorch rows at d12's shape, then the
time of each launch shape (block x num_warps) and of the compiled plain expression's loss part.

    usage (device tool): python3 launch/gpu/tune_loss_kernel.py [$OUT/tune_loss.json]

Rows = 65,536 (d12, device batch 32, T = 2048), vocabulary 32,768, bf16 logits with std 4, softcap
15. Times are medians of 20 calls after 5 warm-ups (CUDA events); "GB/s" counts one read and one
write of the bf16 logits, the least any single-pass kernel moves.
"""

import json
import sys

import torch

sys.path.insert(0, "src")
from chatlm.bench.timing import median, time_calls  # noqa: E402
from chatlm.model.softcap_ce import plain_softcap_ce, softcap_ce_rows_torch  # noqa: E402
from chatlm.model.softcap_ce_triton import softcap_ce_rows_triton  # noqa: E402

M, V, CAP = 65536, 32768, 15.0
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
logits = (torch.randn(M, V, device=dev, generator=g) * 4).to(torch.bfloat16)
targets = torch.randint(0, V, (M,), device=dev, generator=g)
targets[::13] = -1
out: dict = {"rows": M, "vocab": V, "device": torch.cuda.get_device_name()}

# correctness on the first 8192 rows (the torch rows need fp32 temporaries)
rows = 8192
ga = torch.empty_like(logits[:rows])
la = softcap_ce_rows_torch(logits[:rows], targets[:rows], CAP, V, ga)
gb = torch.empty_like(logits[:rows])
lb = softcap_ce_rows_triton(logits[:rows], targets[:rows], CAP, V, gb)
out["check"] = {
    "max_loss_diff": (la - lb).abs().max().item(),
    "max_grad_diff": (ga.float() - gb.float()).abs().max().item(),
    "max_grad": ga.float().abs().max().item(),
}
print("check", out["check"])
gf = torch.empty_like(logits[:rows])
lf = softcap_ce_rows_triton(logits[:rows], targets[:rows], CAP, V, gf, fast_tanh=True)
out["check_fast_tanh"] = {
    "max_loss_diff": (la - lf).abs().max().item(),
    "mean_loss_diff": (la - lf).mean().item(),
    "max_grad_diff": (ga.float() - gf.float()).abs().max().item(),
    "grad_rel_l2": ((ga.float() - gf.float()).norm() / ga.float().norm()).item(),
    "bf16_grad_rel_l2_of_exact": ((ga.float() - gb.float()).norm() / ga.float().norm()).item(),
}
print("check fast tanh", out["check_fast_tanh"])
del gf
del ga, gb

grad = torch.empty_like(logits)
bytes_moved = 2 * logits.numel() * logits.element_size()
shapes = []
for block, warps, fast in [(b, w, False) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)] + [
    (b, w, True) for b in (1024, 2048, 4096) for w in (4, 8)
]:
    if True:
        try:
            t = median(
                time_calls(
                    lambda: softcap_ce_rows_triton(logits, targets, CAP, V, grad, block, warps, fast), 20, 5, dev
                )
            )
        except Exception as e:  # e.g. out of shared memory/registers for a shape
            shapes.append(
                {"block": block, "num_warps": warps, "fast_tanh": fast, "error": str(e).splitlines()[0][:200]}
            )
            continue
        shapes.append(
            {"block": block, "num_warps": warps, "fast_tanh": fast, "ms": 1000 * t, "gb_s": bytes_moved / t / 1e9}
        )
        print(
            f"block {block:5d} warps {warps:2d} fast_tanh {fast:d}: {1000 * t:.3f} ms  "
            f"{bytes_moved / t / 1e9:,.0f} GB/s",
            flush=True,
        )
out["shapes"] = shapes

# the compiled plain expression on the same logits: forward + backward of the loss alone
lg = logits.detach().requires_grad_(True)
plain = torch.compile(lambda z, t: plain_softcap_ce(z, t, CAP))
t_plain = median(time_calls(lambda: torch.autograd.grad(plain(lg, targets), lg), 20, 5, dev))
out["plain_compiled_ms"] = 1000 * t_plain
print(f"compiled plain softcap+CE fwd+bwd on the same logits: {1000 * t_plain:.3f} ms")
path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tune_loss.json"
with open(path, "w") as f:
    json.dump(out, f, indent=2)
