"""Run untrusted, model-written Python (a HumanEval completion plus its tests) and say whether it passed.

Threat model: the code may be wrong, slow, greedy or hostile: infinite loops, fork bombs, 10 GB allocations,
writes outside its directory, network access, reading the evaluator's secrets, killing the evaluator. Every
run returns a SandboxResult; nothing the code does may hang or crash the caller.

Each run is a fresh `python -I -B` process (`sandbox_child.py` is its launcher) in its own session, whose process group
is SIGKILLed when the run ends or times out. It runs in a throw-away directory that is also its HOME and
TMPDIR and is deleted afterwards, with a minimal environment (nothing of the evaluator's is inherited),
stdin at /dev/null, and stdout/stderr captured up to a cap.

OS-enforced: the kernel refuses, whatever the code does. isolation() says which of these this machine applies;
they are probed once by trying them, and a run that cannot apply one the probe found ends with status "error"
rather than running with less.
- rlimits: RLIMIT_AS and RLIMIT_DATA (memory), RLIMIT_CPU (SIGXCPU, one second later SIGKILL), RLIMIT_FSIZE,
  RLIMIT_NOFILE, RLIMIT_CORE=0, and RLIMIT_NPROC=1: no fork and no threads ("nproc_limit"). The kernel does
  not apply RLIMIT_NPROC to root, hence:
- as root, the child switches to a throw-away uid/gid with no groups and no capabilities ("separate_uid"). It
  can then write only its own directory (and world-writable ones such as /tmp), cannot signal the evaluator
  or read its /proc/<pid>/environ, and RLIMIT_NPROC holds. If the interpreter's files are not readable by
  other users (a pyenv Python under /root), the child keeps CAP_DAC_READ_SEARCH so that it can still import
  the standard library: it can then *read* (never write) any file ("restricted_reads" is False);
- no_new_privs: no exec can gain privileges (setuid binaries, file capabilities);
- no network: a new network namespace (unshare(CLONE_NEWNET) as root, CLONE_NEWUSER|CLONE_NEWNET otherwise)
  has no interface up, not even loopback;
- the wall-clock timeout, enforced by the evaluator.

Python-level guards, a prelude that runs before the user code: fork/exec/spawn/system/popen, subprocess,
kill/killpg/pidfd_send_signal raise PermissionError; ctypes, _ctypes and cffi cannot be imported; sockets
cannot be created; open/os.open/os.mkdir/os.rename/... refuse to write outside the sandbox directory and to
read under /proc. They stop ordinary code and the usual tricks with a clear error, but they are NOT a
security boundary: code that digs into the interpreter (gc, re-importing builtin modules, /proc/self/mem)
can undo them, and then only the OS layer holds. So where separate_uid is False because the evaluator is not
root, writes to the user's own files, signals to the evaluator and its /proc/<pid>/environ are stopped only
by these guards (and as root without separate_uid, forks too). Never limited: reading world-readable files,
and the total size written inside the sandbox directory (RLIMIT_FSIZE caps each file, the timeout the rest).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 256  # RLIMIT_AS
    max_output_bytes: int = 65536  # per stream; the rest is counted and dropped
    max_file_bytes: int = 10 * 2**20  # RLIMIT_FSIZE


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    stdout: str
    stderr: str
    error: str  # last line of stderr (the exception), "" when passed
    returncode: int | None
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_code(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Runs `code` as the __main__ module of a fresh sandboxed interpreter; "passed" means exit code 0."""
    return _execute(code, limits)


def run_many(codes: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 4) -> list[SandboxResult]:
    """Runs many programs concurrently (threads that each wait on a subprocess), results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(partial(run_code, limits=limits), codes))


def isolation() -> dict[str, bool]:
    """Which protections this machine applies (probed once, by a child that tries each of them)."""
    try:
        return dict(_isolation())
    except Exception:  # no child could start: nothing applies
        return dict.fromkeys(("separate_process", *_PROBED, "restricted_reads", "python_guards"), False)


# ----------------------------------------------------------------------------------------------
# the evaluator's side

_PYTHON = sys.executable
PROGRAM = "program.py"  # the user's code, in the sandbox directory
SETUP_FAILED = 97  # the launcher's exit code when it could not apply a protection
_LAUNCHER = str(Path(__file__).resolve().with_name("sandbox_child.py"))  # the child's launcher, run as a script
_THROWAWAY_IDS = (range(2**30, 2**30 + 2**20), range(65534, 65535))  # uids/gids for root's children; else nobody
_PROBED = ("network_namespace", "separate_uid", "no_new_privs", "rlimits", "nproc_limit")
_ISOLATION: dict[str, bool] | None = None


def _execute(code: str, limits: SandboxLimits, guards: bool = True) -> SandboxResult:
    """run_code, with the Python-level guards optional (the tests switch them off to check the OS layer alone)."""
    start = time.monotonic()
    try:
        protections = _isolation()  # a failed probe fails the run: never run with less than the probe found
        config = {
            "probe": False,
            "guards": guards,
            "netns": protections["network_namespace"],
            "uid": _pick_uid() if protections["separate_uid"] else None,
            "read_cap": _needs_read_capability(),
            "nnp": protections["no_new_privs"],
        }
        return _launch(code, limits, config)
    except Exception as e:  # the evaluator must get a result, whatever went wrong
        return SandboxResult("error", "", "", f"sandbox failed: {type(e).__name__}: {e}", None, _since(start))


def _isolation() -> dict[str, bool]:
    """isolation(), raising when the probe fails (then it is not cached: the next call tries again)."""
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = _probe()
    return _ISOLATION


def _probe() -> dict[str, bool]:
    """Starts a child that tries every OS protection and reports which ones worked."""
    config = {
        "probe": True,
        "guards": False,
        "netns": True,
        "uid": _pick_uid(),
        "read_cap": _needs_read_capability(),
        "nnp": True,
    }
    result = _launch("", SandboxLimits(), config)
    if result.status != "passed":
        raise RuntimeError(f"the isolation probe failed: {result.error}")
    applied = {name: bool(json.loads(result.stdout)[name]) for name in _PROBED}
    # the kernel ignores RLIMIT_NPROC for root: for runs it holds only with the uid switch (or when not root)
    applied["nproc_limit"] &= applied["separate_uid"] or os.geteuid() != 0
    restricted = applied["separate_uid"] and not config["read_cap"]
    return {"separate_process": True, **applied, "restricted_reads": restricted, "python_guards": True}


def _launch(code: str, limits: SandboxLimits, config: dict[str, Any]) -> SandboxResult:
    """One child in a fresh directory: start it, collect its output until it exits or times out, kill its
    process group either way (taking any stray descendants with it), delete the directory."""
    workdir = tempfile.mkdtemp(prefix="chatlm-sandbox-")
    try:
        Path(workdir, PROGRAM).write_text(code, encoding="utf-8")
        if config["uid"] is not None:
            os.chown(workdir, config["uid"], config["uid"])
        start = time.monotonic()
        argv = [
            _PYTHON,
            "-I",
            "-B",
            _LAUNCHER,
            json.dumps({**config, "limits": asdict(limits), "program": PROGRAM, "setup_failed": SETUP_FAILED}),
        ]
        with subprocess.Popen(
            argv,
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own session and process group, killed as a whole below
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = _Output(limits.max_output_bytes), _Output(limits.max_output_bytes)
            outputs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
            try:
                finished = _watch(proc, outputs, start + limits.timeout_s)
            finally:
                _kill_group(proc.pid)
            _drain(outputs, seconds=1.0)
            proc.wait()
        return _result(proc.returncode, out, err, not finished, _since(start), limits)
    finally:
        _remove_tree(workdir)


def _child_env(workdir: str) -> dict[str, str]:
    """A minimal environment; one thread for the BLAS libraries, which fail to start under RLIMIT_NPROC=1."""
    single_threaded = dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", **single_threaded}


class _Output:
    """The first `cap` bytes of a stream (the rest is counted and dropped), and its tail for the error line."""

    TAIL = 4096

    def __init__(self, cap: int) -> None:
        self.cap, self.head, self.tail, self.total = cap, bytearray(), b"", 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.head += chunk[: max(0, self.cap - len(self.head))]
        self.tail = (self.tail + chunk)[-self.TAIL :]

    def text(self) -> str:
        text = self.head.decode(errors="replace")
        dropped = self.total - len(self.head)
        return text + f"\n[... {dropped} more bytes not kept]" if dropped else text

    def last_line(self) -> str:
        lines = self.tail.decode(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


def _watch(proc: subprocess.Popen[bytes], outputs: dict[int, _Output], deadline: float) -> bool:
    """Collects the output until the child exits (True) or the deadline passes (False)."""
    with selectors.DefaultSelector() as sel:
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        while not _exited(proc):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _read_some(sel, outputs, min(left, 0.05))
    return True


def _drain(outputs: dict[int, _Output], seconds: float) -> None:
    """Reads what the killed process group left in the pipes (bounded: an escaped grandchild might hold them)."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            _read_some(sel, outputs, 0.05)


def _read_some(sel: selectors.BaseSelector, outputs: dict[int, _Output], timeout: float) -> None:
    if not sel.get_map():  # both pipes closed, the process still running
        time.sleep(timeout)
        return
    for key, _ in sel.select(timeout):
        chunk = os.read(key.fd, 1 << 16)
        if chunk:
            outputs[key.fd].add(chunk)
        else:
            sel.unregister(key.fd)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child exited, without reaping it: until it is reaped its pid, which is also its process
    group id, cannot be reused, so killing the group afterwards cannot hit anyone else."""
    if not hasattr(os, "waitid"):  # macOS
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _result(
    returncode: int | None, out: _Output, err: _Output, timed_out: bool, duration: float, limits: SandboxLimits
) -> SandboxResult:
    error = err.last_line()
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # SIGKILL: the hard CPU limit
        status = "timeout"
        error = f"timed out after {limits.timeout_s:g} s" if timed_out else f"CPU limit of {limits.cpu_s} s exceeded"
    elif returncode == 0:
        status, error = "passed", ""
    elif returncode == SETUP_FAILED:
        status = "error"
    elif error.startswith("MemoryError"):
        status = "memory"
    else:
        status = "failed"
    if not error and status != "passed":
        error = f"exit code {returncode}" if returncode is None or returncode >= 0 else _signal_name(-returncode)
    return SandboxResult(status, out.text(), err.text(), error, returncode, duration)


def _signal_name(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _remove_tree(path: str) -> None:
    """Deletes the sandbox directory, after making its directories usable again (the code may chmod them 000)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            sub = os.path.join(top, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _pick_uid() -> int | None:
    """A random throw-away uid (and gid of the same number) for root's children, so that concurrent sandboxes
    cannot signal each other either; None when not root or when this user namespace maps none of them."""
    if os.geteuid() != 0:
        return None
    for ids in _THROWAWAY_IDS:
        if _mapped(ids, "/proc/self/uid_map") and _mapped(ids, "/proc/self/gid_map"):
            return ids.start + int.from_bytes(os.urandom(4), "little") % len(ids)
    return None


def _mapped(ids: range, map_file: str) -> bool:
    """Whether all of `ids` exist in this user namespace (each map line: first id inside, outside, count)."""
    try:
        extents = [line.split() for line in Path(map_file).read_text().splitlines()]
    except OSError:
        return False
    return any(int(first) <= ids.start and ids.stop <= int(first) + int(count) for first, _, count in extents)


@cache
def _needs_read_capability() -> bool:
    """Whether a throw-away uid could not read this interpreter's library (e.g. a pyenv Python under /root)."""
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    return not all(_others_can_read(sysconfig.get_path(name)) for name in names)


def _others_can_read(path: str) -> bool:
    target = Path(path).resolve()
    try:
        searchable = all(d.stat().st_mode & stat.S_IXOTH for d in target.parents)
        return searchable and target.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) == stat.S_IROTH | stat.S_IXOTH
    except OSError:  # a directory that does not exist is never imported from
        return True


def _since(start: float) -> float:
    return time.monotonic() - start
