"""FLOPs accounting and model FLOPs utilization (MFU).

Training FLOPs per token follow nanochat (PaLM convention, no causal halving; windows honoured):

    6 * (matmul params)  +  sum over layers of 12 * H * D * min(window_l, T)

where matmul params are every Linear weight, lm_head (padded vocab) included, and embeddings and
scalars are not. Unlike nanochat at 92d63d4, fp8 linears count too: an fp8 matmul does the same
number of FLOPs, and MFU is reported against the bf16 dense peak either way (say so when printing).

MFU = FLOPs/token * tokens/s / (peak FLOP/s per device * devices). With no known peak the result
is None ("n/a"), never a misleading 0 or a number against an invented peak.
"""

from __future__ import annotations

from typing import Optional, Sequence

# Dense bf16 peak FLOP/s per device, matched as a case-insensitive substring of the device name;
# the first match wins, so the more specific names come first (H100 NVL before H100).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("gb200", 2.5e15),
    ("grace blackwell", 2.5e15),
    ("b200", 2.25e15),
    ("b100", 1.8e15),
    ("h200 nvl", 836e12),
    ("h200 pcie", 836e12),
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h800 nvl", 989e12),
    ("h800", 756e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("a40", 149.7e12),
    ("a30", 165e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("mi355", 2.5e15),
    ("mi325", 1.3074e15),
    ("mi300x", 1.3074e15),
    ("mi300a", 980.6e12),
    ("mi250x", 383e12),
    ("mi250", 362.1e12),
    ("rtx 5090", 209.5e12),
    ("4090", 165.2e12),
    ("3090", 71e12),
)


def peak_flops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak of a device by name (`override` wins); None when unknown."""
    if override:
        return float(override)
    name = device_name.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def attention_flops_per_token(n_head: int, head_dim: int, windows: Sequence[int], seq_len: int) -> int:
    """Training (fwd+bwd) attention FLOPs per token: 12*H*D*min(w, T) per layer."""
    return sum(12 * n_head * head_dim * min(int(w), seq_len) for w in windows)


def train_flops_per_token(matmul_params: int, n_head: int, head_dim: int, windows: Sequence[int], seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight plus attention scores and values."""
    return 6 * int(matmul_params) + attention_flops_per_token(n_head, head_dim, windows, seq_len)


def mfu(flops_per_token: float, tokens_per_second: float, peak: Optional[float], devices: int = 1) -> Optional[float]:
    """Model FLOPs utilization as a fraction in [0, 1]; None when the peak is unknown."""
    if not peak or peak <= 0 or devices < 1:
        return None
    return flops_per_token * tokens_per_second / (peak * devices)


def format_mfu(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
