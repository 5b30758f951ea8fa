"""Run untrusted, model-written Python (a HumanEval completion plus its tests) and say whether it passed.

Threat model: the code may be wrong, slow, greedy or hostile: infinite loops, fork bombs, 10 GB allocations,
writes outside its directory, network access, reading the evaluator's secrets, killing the evaluator. Every
run returns a SandboxResult; nothing the code does may hang or crash the caller.

Each run is a fresh `python -I -B` process (this file is its launcher) in its own session, whose process group
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

import builtins
import contextlib
import errno
import io
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, NoReturn


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
_LAUNCHER = str(Path(__file__).resolve())  # this file, run as a script, is the child's launcher
_PROGRAM = "program.py"  # the user's code, in the sandbox directory
_SETUP_FAILED = 97  # the launcher's exit code when it could not apply a protection
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
        Path(workdir, _PROGRAM).write_text(code, encoding="utf-8")
        if config["uid"] is not None:
            os.chown(workdir, config["uid"], config["uid"])
        start = time.monotonic()
        argv = [_PYTHON, "-I", "-B", _LAUNCHER, json.dumps({**config, "limits": asdict(limits)})]
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
    elif returncode == _SETUP_FAILED:
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


# ----------------------------------------------------------------------------------------------
# the child's side: `python -I -B sandbox.py CONFIG` in the sandbox directory

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 1, 8, 38
_CAP_DAC_READ_SEARCH, _LINUX_CAPABILITY_VERSION_3 = 2, 0x20080522
_BLOCKED_MODULES = {"ctypes", "_ctypes", "cffi", "_cffi_backend"}
_NETWORK_CALLS = ("socket", "socketpair", "fromfd", "create_connection", "create_server")
_PATH_MUTATORS = (  # the os functions that change the file system, by path
    *("mkdir", "rmdir", "remove", "unlink", "rename", "replace", "link", "symlink", "truncate"),
    *("chmod", "chown", "lchown", "utime", "mkfifo", "mknod"),
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _child_main(config: dict[str, Any]) -> None:
    source = Path(_PROGRAM).read_text(encoding="utf-8")  # before the uid switch
    try:
        applied = _isolate(config)
    except Exception as e:
        print(f"sandbox setup failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(_SETUP_FAILED)
    if config["probe"]:
        print(json.dumps({**applied, "nproc_limit": _fork_is_blocked()}))
        return
    if config["guards"]:
        _install_guards(os.path.realpath(os.getcwd()))
    _run_program(source)


def _isolate(config: dict[str, Any]) -> dict[str, bool]:
    """Applies the OS protections, in the one order that works: the network namespace needs root, the uid
    switch gives root up, the limits come last. A failure is fatal, except in the probe, which records it."""
    applied: dict[str, bool] = {}

    def apply(name: str, wanted: bool, action: Callable[[], None]) -> None:
        applied[name] = False
        if wanted:
            try:
                action()
                applied[name] = True
            except Exception:
                if not config["probe"]:
                    raise

    as_root = os.geteuid() == 0
    netns_flags = _CLONE_NEWNET if as_root else _CLONE_NEWUSER | _CLONE_NEWNET
    apply("network_namespace", config["netns"], lambda: _unshare(netns_flags))
    apply("separate_uid", config["uid"] is not None, lambda: _switch_uid(config["uid"], config["read_cap"]))
    apply("no_new_privs", config["nnp"], lambda: _prctl(_PR_SET_NO_NEW_PRIVS, 1))
    with contextlib.suppress(Exception):  # best effort: die with the evaluator
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    applied["rlimits"] = _set_limits(config["limits"])
    return applied


def _libc(name: str, *args: Any) -> None:
    import ctypes  # only here, before the guards forget it

    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")


def _prctl(option: int, value: int) -> None:
    import ctypes

    _libc("prctl", ctypes.c_int(option), *(ctypes.c_ulong(v) for v in (value, 0, 0, 0)))


def _unshare(flags: int) -> None:
    unshare = getattr(os, "unshare", None)  # Python >= 3.12
    if unshare is not None:
        unshare(flags)
    else:
        import ctypes

        _libc("unshare", ctypes.c_int(flags))


def _switch_uid(uid: int, keep_read: bool) -> None:
    """root -> `uid`/`uid`: no supplementary groups and no capabilities (CAP_DAC_READ_SEARCH kept if asked)."""
    if keep_read and not _permitted(_CAP_DAC_READ_SEARCH):  # checked first, not to fail half-way
        raise OSError(errno.EPERM, "CAP_DAC_READ_SEARCH is not in the permitted set")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    if keep_read:
        _prctl(_PR_SET_KEEPCAPS, 1)  # keep the permitted set across setresuid, to pick from it below
    os.setresuid(uid, uid, uid)  # without KEEPCAPS this alone clears every capability
    if keep_read:
        import ctypes

        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)  # pid 0: this thread
        mask = 1 << _CAP_DAC_READ_SEARCH  # {effective, permitted, inheritable} for caps 0-31, then 32-63
        _libc("capset", header, (ctypes.c_uint32 * 6)(mask, mask, 0, 0, 0, 0))
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(errno.EPERM, f"still uid {os.getuid()}")


def _permitted(capability: int) -> bool:
    status = Path("/proc/self/status").read_text()
    permitted = next(line.split()[1] for line in status.splitlines() if line.startswith("CapPrm:"))
    return bool(int(permitted, 16) >> capability & 1)


def _set_limits(limits: dict[str, Any]) -> bool:
    """Sets the rlimits (never above the current hard limit); False if one is unsupported (RLIMIT_AS on macOS)."""
    memory, cpu = limits["memory_mb"] * 2**20, limits["cpu_s"]
    wanted = {
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_DATA: (memory, memory),
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        resource.RLIMIT_FSIZE: (limits["max_file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (64, 64),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NPROC: (1, 1),  # this process only: no fork, no threads (ignored for root)
    }
    ok = True
    for which, (soft, hard) in wanted.items():
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            ok = False
    return ok


def _fork_is_blocked() -> bool:
    """The probe's check that RLIMIT_NPROC holds: fork must fail."""
    try:
        pid = os.fork()
    except OSError:
        return True
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return False


class _BlockedImports:
    """A meta path finder that refuses the modules that reach libc directly."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.partition(".")[0] in _BLOCKED_MODULES:
            raise ImportError(f"import of {fullname} is disabled in the sandbox")
        return None


def _install_guards(root: str) -> None:
    """The Python-level prelude (see the module docstring for what it is worth)."""
    import _posixsubprocess
    import _socket
    import posix
    import socket

    sys.meta_path.insert(0, _BlockedImports())
    for name in [m for m in sys.modules if m.partition(".")[0] in _BLOCKED_MODULES]:
        del sys.modules[name]  # the launcher's own ctypes
    for module in (os, posix):
        names = [n for n in dir(module) if n.startswith(("fork", "exec", "spawn", "posix_spawn"))]
        _refuse_all(module, [*names, "system", "popen", "kill", "killpg"])
    _refuse_all(_posixsubprocess, ["fork_exec"])
    _refuse_all(subprocess.Popen, ["_execute_child"], label="subprocess")
    _refuse_all(signal, ["pidfd_send_signal"])
    _refuse_all(socket, _NETWORK_CALLS)
    _refuse_all(_socket, _NETWORK_CALLS)
    _guard_files(root)


def _refuse_all(owner: Any, names: Sequence[str], label: str | None = None) -> None:
    for name in names:
        if hasattr(owner, name):
            setattr(owner, name, _refusal(label or f"{owner.__name__}.{name}"))


def _refusal(what: str) -> Callable[..., NoReturn]:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise PermissionError(f"{what} is disabled in the sandbox")

    return refused


def _guard_files(root: str) -> None:
    """open/os.open and the os functions that change the file system write only under `root` (or /dev/null),
    and nothing reads under /proc (the evaluator's /proc/<pid>/environ)."""
    import posix

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        _check_path(root, file, write=any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        _check_path(root, path, write=bool(flags & _WRITE_FLAGS), dir_fd=dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    for module in (builtins, io):
        setattr(module, "open", guarded_open)  # noqa: B010 (mypy refuses assigning to a function)
    for module in (os, posix):
        setattr(module, "open", guarded_os_open)  # noqa: B010
        for name in _PATH_MUTATORS:
            if hasattr(module, name):
                setattr(module, name, _checked(root, getattr(module, name)))


def _checked(root: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if "src_dir_fd" in kwargs or "dst_dir_fd" in kwargs:
            raise PermissionError(f"{func.__name__} with src_dir_fd/dst_dir_fd is disabled in the sandbox")
        paths = [*args, *(kwargs[k] for k in ("path", "src", "dst") if k in kwargs)]
        for path in paths:
            if isinstance(path, str | bytes | os.PathLike):
                _check_path(root, path, write=True, dir_fd=kwargs.get("dir_fd"))
        return func(*args, **kwargs)

    return guarded


def _check_path(root: str, path: Any, write: bool, dir_fd: int | None = None) -> None:
    if isinstance(path, int):  # an open file descriptor
        return
    name = os.fsdecode(path)
    if name in ("/dev/stdout", "/dev/stderr"):  # the captured pipes (they resolve to /proc/self/fd/...)
        return
    if dir_fd is not None and not os.path.isabs(name):
        name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
    real = os.path.realpath(name)  # follows symlinks: a link in the sandbox cannot point out of it
    if _within(real, "/proc") or (write and real != os.devnull and not _within(real, root)):
        raise PermissionError(errno.EACCES, "the sandbox writes only in its directory and reads nothing in /proc", name)


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _run_program(source: str) -> None:
    """Runs the code as a fresh __main__ module; an uncaught exception prints its traceback (without the
    launcher's frame) and exits 1, as `python program.py` would."""
    launcher = sys.modules["__main__"]  # noqa: F841 (kept alive: the guards live in its globals)
    main = types.ModuleType("__main__")
    main.__file__ = _PROGRAM
    sys.modules["__main__"] = main
    sys.argv = [_PROGRAM]
    try:
        exec(compile(source, _PROGRAM, "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        sys.exit(1)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
