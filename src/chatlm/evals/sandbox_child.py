"""The sandbox's child side: `python -I -B sandbox_child.py CONFIG`, started by
`chatlm.evals.sandbox` in a throw-away directory. It applies the OS protections (namespaces, a
throw-away uid, no_new_privs, rlimits), installs the Python guards and runs the program; see
`chatlm.evals.sandbox` for the threat model. Standard library only: it runs in isolated mode,
where chatlm is not importable; the parent passes everything it needs in CONFIG.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
    program = config["program"]  # the user's code's file name, in the sandbox directory
    source = Path(program).read_text(encoding="utf-8")  # before the uid switch
    try:
        applied = _isolate(config)
    except Exception as e:
        print(f"sandbox setup failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(config["setup_failed"])
    if config["probe"]:
        print(json.dumps({**applied, "nproc_limit": _fork_is_blocked()}))
        return
    if config["guards"]:
        _install_guards(os.path.realpath(os.getcwd()))
    _run_program(source, program)


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


def _run_program(source: str, program: str) -> None:
    """Runs the code as a fresh __main__ module; an uncaught exception prints its traceback (without the
    launcher's frame) and exits 1, as `python program.py` would."""
    launcher = sys.modules["__main__"]  # noqa: F841 (kept alive: the guards live in its globals)
    main = types.ModuleType("__main__")
    main.__file__ = program
    sys.modules["__main__"] = main
    sys.argv = [program]
    try:
        exec(compile(source, program, "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        sys.exit(1)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
