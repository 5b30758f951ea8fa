"""Fixtures for the kernel tests."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def triton_interpreter():
    """Run a script in a subprocess with TRITON_INTERPRET=1 (it must be set before Triton is
    imported) and return the JSON object its last stdout line prints."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; install with pip install -e '.[dev]'")

    def run(script: str) -> dict:
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
