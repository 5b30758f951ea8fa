"""`chatlm runs sync --wandb`: push the offline W&B runs kept under run directories.

The wandb sink (chatlm.runtime.sinks) runs W&B offline by default, writing
`<run dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`. Uploading is `wandb sync <that dir>`, run
here as a subprocess with a time limit. What blocks an upload without being a fault of the runs (no
wandb package, no network, no API key) is explained with the command to run later, not raised.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from chatlm.runtime.sinks import WANDB_DIR, WANDB_INSTALL

DEFAULT_BASE_URL = "https://api.wandb.ai"
_LOG_MAGIC = b":W&B"
_BLOCK = 32768
_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass(frozen=True)
class OfflineRun:
    """One offline W&B run directory and what its transaction log holds."""

    path: Path
    run_id: str
    log_file: Optional[Path]  # run-<id>.wandb
    history_rows: Optional[int]  # None: the log could not be read
    first_step: Optional[int]
    last_step: Optional[int]
    synced: bool  # `wandb sync` left its run-<id>.wandb.synced marker

    def describe(self) -> str:
        if self.log_file is None:
            what = "no .wandb log file"
        elif self.history_rows is None:
            what = "history unreadable"
        elif self.history_rows == 0:
            what = "0 history rows"
        else:
            what = f"{self.history_rows} history rows, steps {self.first_step}..{self.last_step}"
        return f"{self.path} (run id {self.run_id}, {what}{', already synced' if self.synced else ''})"


# ----------------------------------------------------------------------------------------------
# reading the .wandb transaction log (32 KiB blocks of length-prefixed, possibly split, records)


def _log_payloads(data: bytes) -> Iterator[bytes]:
    """The record payloads of a .wandb log, reassembled from their FIRST/MIDDLE/LAST chunks."""
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the tail of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length:  # torn at the end (a run still writing, or killed)
            return
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def history_steps(log_file: Path) -> Optional[list[int]]:
    """The step of every history record in a .wandb log; None if it cannot be read."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb

        data = log_file.read_bytes()
        if data[:4] != _LOG_MAGIC:
            return None
        steps = []
        for payload in _log_payloads(data):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                steps.append(int(record.history.step.num))
        return steps
    except Exception:  # noqa: BLE001 - no wandb, a torn or foreign file: the count is just unknown
        return None


# ----------------------------------------------------------------------------------------------
# finding offline runs


def _run_id(offline_dir: Path) -> str:
    return offline_dir.name.rsplit("-", 1)[-1]


def read_offline_run(offline_dir: Path) -> OfflineRun:
    run_id = _run_id(offline_dir)
    log_file = offline_dir / f"run-{run_id}.wandb"
    if not log_file.is_file():
        found = sorted(offline_dir.glob("run-*.wandb"))
        log_file = found[0] if found else None
    steps = history_steps(log_file) if log_file is not None else None
    synced = log_file is not None and log_file.with_name(log_file.name + ".synced").exists()
    return OfflineRun(
        path=offline_dir,
        run_id=run_id,
        log_file=log_file,
        history_rows=None if steps is None else len(steps),
        first_step=min(steps) if steps else None,
        last_step=max(steps) if steps else None,
        synced=synced,
    )


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """The offline W&B runs under `<run dir>/wandb/` (the `latest-run` link not followed twice)."""
    wandb_dir = Path(run_dir) / WANDB_DIR
    if not wandb_dir.is_dir():
        return []
    dirs = sorted(p for p in wandb_dir.glob("offline-run-*") if p.is_dir() and not p.is_symlink())
    return [read_offline_run(p) for p in dirs]


def online_run_dirs(run_dir: Path) -> list[Path]:
    wandb_dir = Path(run_dir) / WANDB_DIR
    return sorted(p for p in wandb_dir.glob("run-*") if p.is_dir() and not p.is_symlink()) if wandb_dir.is_dir() else []


# ----------------------------------------------------------------------------------------------
# what can block an upload


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def unreachable_reason(url: str, timeout_s: float = 5.0) -> Optional[str]:
    """None if a TCP connection to the URL's host and port opens; else why not."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"WANDB_BASE_URL {url!r} has no host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"cannot reach {url} ({e.strerror or type(e).__name__})"


def blocked_reason(timeout_s: float = 5.0) -> Optional[str]:
    """Why no upload can start here (wandb missing, W&B server unreachable), or None."""
    if not wandb_installed():
        return f"the wandb package is not installed ({WANDB_INSTALL})"
    return unreachable_reason(base_url(), timeout_s)


def sync_command(offline_dir: Path) -> list[str]:
    return [sys.executable, "-m", "wandb", "sync", str(offline_dir)]


@dataclass(frozen=True)
class SyncOutcome:
    offline_dir: Path
    ok: bool
    blocked: bool  # not a fault of the run: no API key, no network (try again later)
    message: str


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def classify_failure(offline_dir: Path, returncode: int, output: str) -> SyncOutcome:
    """A failed `wandb sync`: blocked (API key, network) or a real error, with a one-line message."""
    low = output.lower()
    if "no api key" in low or "api key" in low and "not" in low:
        return SyncOutcome(offline_dir, False, True, "no W&B API key: run `wandb login` or set WANDB_API_KEY")
    network = (
        "connection refused",
        "max retries",
        "timed out",
        "name or service not known",
        "temporary failure in name resolution",
        "network is unreachable",
        "connectionerror",
    )
    if any(word in low for word in network):
        return SyncOutcome(offline_dir, False, True, f"network error talking to {base_url()}: {_last_line(output)}")
    return SyncOutcome(offline_dir, False, False, f"wandb sync exited with {returncode}: {_last_line(output)}")


def sync_offline_run(offline_dir: Path, timeout_s: float) -> SyncOutcome:
    """`wandb sync OFFLINE_DIR` with a time limit (a hang without network counts as blocked)."""
    try:
        done = subprocess.run(
            sync_command(offline_dir), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return SyncOutcome(
            offline_dir, False, True, f"wandb sync did not finish within {timeout_s:g}s (no network to {base_url()}?)"
        )
    except OSError as e:
        return SyncOutcome(offline_dir, False, False, f"could not start wandb sync: {e}")
    if done.returncode == 0:
        return SyncOutcome(offline_dir, True, False, f"synced {offline_dir}")
    return classify_failure(offline_dir, done.returncode, (done.stdout or "") + "\n" + (done.stderr or ""))
