"""Keep the interpreter's shutdown from printing a leak report at the end of every command.

Using meta tensors (every model build does) imports torch._dynamo, which imports Triton when it is
installed (the dev and test environments have it). Triton's nanobind bindings then print about 30
lines of "nanobind: leaked ... instances" while the interpreter tears its modules down, after the
command has finished and said everything it had to say. `at_exit_silence_stderr()` registers an
exit hook that points file descriptor 2 at /dev/null once every other exit hook registered after it
has run. CHATLM_SHOW_SHUTDOWN=1 keeps the output (to look for real shutdown errors).
"""

from __future__ import annotations

import atexit
import os
import sys

_registered = False


def _silence() -> None:
    if "triton" not in sys.modules or os.environ.get("CHATLM_SHOW_SHUTDOWN"):
        return
    try:
        sys.stderr.flush()
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except (OSError, ValueError):
        pass


def at_exit_silence_stderr() -> None:
    """Register the hook once per process (see the module docstring)."""
    global _registered
    if not _registered:
        atexit.register(_silence)
        _registered = True
