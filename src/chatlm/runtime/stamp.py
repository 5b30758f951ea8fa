"""The timestamp + random suffix that names a run (or sweep) directory.

One value per process, created on first use. When several processes each run Hydra for the same
run (`torchrun`, plain `srun`), `chatlm.hydra.app` makes rank 0 create it and hands it to the others
(`chatlm.runtime.dist.agree_on_stamp`) before any of them composes, so all build the same path.
"""

from __future__ import annotations

import secrets
from datetime import datetime

_current: dict[str, str] | None = None


def new() -> dict[str, str]:
    now = datetime.now()
    return {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H-%M-%S"), "suffix": secrets.token_hex(2)}


def current() -> dict[str, str]:
    global _current
    if _current is None:
        _current = new()
    return _current


def set_current(value: dict[str, str]) -> None:
    global _current
    _current = dict(value)


def reset() -> None:
    """Forget the stamp (tests that compose several runs in one process)."""
    global _current
    _current = None
