"""Whether chatlm's Triton kernels can be used here (resolved once per process)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports and the kernel modules (softcap_ce_triton, qkv_rope_triton) load."""
    try:
        import chatlm.model.qkv_rope_triton  # noqa: F401
        import chatlm.model.softcap_ce_triton  # noqa: F401
    except Exception:  # ImportError, or a Triton that fails to initialise
        return False
    return True
