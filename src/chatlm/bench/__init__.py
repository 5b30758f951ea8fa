"""`python -m chatlm.bench`: throughput and MFU of training steps, and attention kernel timings.

- `task=train` builds the model, fp8 conversion, torch.compile and MuonAdamW the way
  pretraining does, runs `Trainer.step()` for `steps` optimizer steps on synthetic ids (or the real loader), leaves
  the first `warmup_steps` out, and reports the median step time, tok/s, MFU against the nominal
  peak and against a bf16 matmul ceiling measured in the same process, peak memory and what ran.
- `task=attention` times fwd+bwd of every attention backend this machine can run at the model's
  shapes (B, T, H, D and each window of its pattern), with an fp32 reference check.
- `task=loss` times fwd+bwd of lm_head + softcapped cross-entropy with each loss kernel (plain,
  fused, fused_logits) at the model's shapes, with the memory each adds and its error vs plain.

Both write `bench.json` into the run directory and print a table. The library modules here never
import Hydra; `chatlm/bench/__main__.py` is the Hydra edge.
"""

from chatlm.bench.attention_bench import bench_attention
from chatlm.bench.timing import matmul_ceiling, median
from chatlm.bench.train_bench import bench_train

__all__ = ["bench_attention", "bench_train", "matmul_ceiling", "median"]
