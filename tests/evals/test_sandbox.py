"""The code sandbox: normal results, the limits, and escape attempts that must fail safely with a result.

Tests named `..._without_the_guards` switch the Python-level prelude off (sandbox._execute(guards=False)) to
check that the OS layer alone holds; they are skipped where isolation() says the machine does not apply it.
Attempts that could kill the evaluator run in a separate evaluator process, never in pytest's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from chatlm.evals import sandbox
from chatlm.evals.sandbox import SandboxLimits, isolation, run_code, run_many

QUICK = SandboxLimits(timeout_s=1.0)


def require(protection: str) -> None:
    if not isolation()[protection]:
        pytest.skip(f"this machine does not apply {protection} (isolation(): {isolation()})")


def live_processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (session id, command line) of every process that is not a zombie."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if state != "Z":
                found[int(entry.name)] = (int(session), cmdline)
    return found


def survivors(session: int, marker: str, wait_s: float = 2.0) -> list[int]:
    """Processes still alive in the sandbox child's session, or carrying `marker` in their command line."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid, (s, cmd) in live_processes().items() if s == session or marker.encode() in cmd]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# the sandbox in a separate evaluator process (its own session): a child that got out could kill only that one.
# It loads sandbox.py from its file: importing chatlm.evals would import torch, seconds per test.
EVALUATOR = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
result = sandbox._execute(sys.argv[2], sandbox.SandboxLimits(), guards=sys.argv[3] == "guards")
own_environ = open("/proc/self/environ").read()
print(json.dumps({"status": result.status, "error": result.error, "output": result.stdout + result.stderr,
                  "own_environ": own_environ}))
"""


def evaluate_elsewhere(code: str, guards: bool = True, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", EVALUATOR, sandbox.__file__, code, "guards" if guards else "bare"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert proc.returncode == 0 and proc.stdout, f"the evaluator died (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------------------------
# normal behaviour

HUMANEVAL_LIKE = '''
def add(a: int, b: int) -> int:
    """Return the sum of a and b."""
    return a + b


def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0


check(add)
'''


def test_a_correct_solution_passes():
    r = run_code(HUMANEVAL_LIKE)
    assert (r.status, r.passed, r.error, r.returncode) == ("passed", True, "", 0)
    assert 0 < r.duration_s < 10


def test_a_failing_assert_fails_with_the_error_line():
    r = run_code(HUMANEVAL_LIKE.replace("return a + b", "return a - b"))
    assert (r.status, r.passed, r.returncode) == ("failed", False, 1)
    assert r.error == "AssertionError"
    assert 'File "program.py", line 8, in check' in r.stderr


@pytest.mark.parametrize(
    "code, status, returncode, error",
    [
        ("def f(:\n    pass", "failed", 1, "SyntaxError: invalid syntax"),
        ("raise ValueError('bad value')", "failed", 1, "ValueError: bad value"),
        ("import sys; sys.exit(3)", "failed", 3, "exit code 3"),
        ("raise SystemExit(0)", "passed", 0, ""),
    ],
)
def test_exit_status_and_errors(code, status, returncode, error):
    r = run_code(code)
    assert (r.status, r.returncode, r.error) == (status, returncode, error)


def test_output_is_captured_and_the_code_runs_as_main():
    r = run_code("import sys\nprint(__name__)\nprint('to stderr', file=sys.stderr)")
    assert (r.status, r.stdout, r.stderr) == ("passed", "__main__\n", "to stderr\n")


def test_output_beyond_the_cap_is_dropped():
    r = run_code("print('x' * 100_000)\nraise KeyError('last')", SandboxLimits(max_output_bytes=1000))
    assert r.status == "failed" and r.error == "KeyError: 'last'"
    assert r.stdout.startswith("x" * 1000) and "x" * 1001 not in r.stdout
    assert r.stdout.endswith("[... 99001 more bytes not kept]")


def test_a_print_loop_is_capped_and_times_out():
    start = time.monotonic()
    r = run_code("while True:\n    print('spam' * 100)", SandboxLimits(timeout_s=1.0, max_output_bytes=4096))
    assert r.status == "timeout" and time.monotonic() - start < 10
    assert len(r.stdout) < 4096 + 100 and r.stdout.startswith("spam")


def test_an_evaluator_side_failure_is_an_error_result(monkeypatch):
    r = run_code("print('\ud800')")  # a lone surrogate cannot be written as UTF-8
    assert (r.status, r.returncode) == ("error", None) and "UnicodeEncodeError" in r.error
    isolation()  # probed with the real interpreter first
    monkeypatch.setattr(sandbox, "_PYTHON", "/nonexistent/python")
    r = run_code("print(1)")
    assert (r.status, r.returncode) == ("error", None) and "FileNotFoundError" in r.error


def test_run_many_runs_concurrently_in_input_order():
    codes = [f"import time\ntime.sleep(1)\nprint({i})" for i in range(4)] + ["assert False"]
    start = time.monotonic()
    results = run_many(codes, workers=4)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results[:4]] == ["0\n", "1\n", "2\n", "3\n"]
    assert [r.status for r in results] == ["passed"] * 4 + ["failed"]
    assert elapsed < 3.5, f"{elapsed:.1f} s: the four 1 s sleeps did not overlap"


def test_isolation_says_what_each_run_gets():
    got = isolation()
    assert set(got) == {
        "separate_process",
        "rlimits",
        "network_namespace",
        "separate_uid",
        "no_new_privs",
        "nproc_limit",
        "restricted_reads",
        "python_guards",
    }
    assert all(isinstance(v, bool) for v in got.values())
    assert got["separate_process"] and got["python_guards"] and got["rlimits"]
    r = run_code(
        "import os, resource, socket\n"
        "print(os.getsid(0) == os.getpid(), os.getuid(), resource.getrlimit(resource.RLIMIT_AS)[0] // 2**20)\n"
        "print(sorted(name for _, name in socket.if_nameindex()))"
    )
    own_session, uid, memory_mb = r.stdout.splitlines()[0].split()
    assert (r.status, own_session, memory_mb) == ("passed", "True", "256")
    if got["separate_uid"]:
        assert int(uid) != 0 and int(uid) != os.getuid()
    if got["network_namespace"]:
        assert r.stdout.splitlines()[1] == "['lo']"  # a fresh namespace: only a loopback, and it is down


# ----------------------------------------------------------------------------------------------
# the limits


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_a_program_that_never_ends_times_out_and_leaves_nothing_behind(code):
    start = time.monotonic()
    r = run_code(f"import os\nprint(os.getpid(), flush=True)\n{code}", QUICK)
    assert (r.status, r.returncode, r.error) == ("timeout", -signal.SIGKILL, "timed out after 1 s")
    assert 0.9 < r.duration_s and time.monotonic() - start < 10
    assert survivors(int(r.stdout.split()[0]), marker=str(uuid.uuid4())) == []


def test_the_cpu_limit_is_a_timeout():
    r = run_code("while True:\n    pass", SandboxLimits(timeout_s=20, cpu_s=1))
    assert (r.status, r.returncode, r.error) == ("timeout", -signal.SIGXCPU, "CPU limit of 1 s exceeded")
    assert r.duration_s < 10


@pytest.mark.parametrize("code", ["x = bytearray(10 * 2**30)", "x = 'a' * (10 * 2**30)", "x = [0] * (2**31)"])
def test_a_huge_allocation_is_a_memory_error_quickly(code):
    r = run_code(code)
    assert (r.status, r.error) == ("memory", "MemoryError") and r.duration_s < 5


def test_a_moderate_allocation_fits():
    assert run_code("x = bytearray(100 * 2**20)\nprint(len(x))").stdout == f"{100 * 2**20}\n"


def test_files_are_capped():
    code = "open('small', 'wb').write(b'x' * 2**19)\nopen('big', 'wb').write(b'x' * 2**21)"
    r = run_code(code, SandboxLimits(max_file_bytes=2**20))
    assert (r.status, r.error) == ("failed", "OSError: [Errno 27] File too large")


# ----------------------------------------------------------------------------------------------
# escapes: the file system

WRITE_ATTEMPTS = """
import os, pathlib, shutil
attempts = {
    "open": lambda p: open(p, "w").write("x"),
    "pathlib": lambda p: pathlib.Path(p).write_text("x"),
    "os.open": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT)),
    "mkdir": lambda p: os.mkdir(p),
    "symlink": lambda p: (os.symlink(p, "link-" + os.path.basename(p)), open("link-" + os.path.basename(p), "w")),
    "rename": lambda p: (open("local", "w").write("x"), os.rename("local", p)),
    "copy": lambda p: (open("local", "w").write("x"), shutil.copy("local", p)),
}
for base in TARGETS:
    for name, attempt in attempts.items():
        try:
            attempt(f"{base}-{name}")
            print("wrote", name, base)
        except OSError as e:
            print("blocked", name, "by the guard" if "sandbox" in str(e) else "by the OS")
open(os.path.expanduser("~/pwned"), "w").write("in the sandbox's own home: fine")
print(os.getcwd(), os.path.expanduser("~"))
"""


def attempt_writes(tmp_path: Path, guards: bool) -> None:
    targets = [str(Path.home() / f"pwned-{uuid.uuid4().hex}"), str(tmp_path / "outside" / "pwned")]
    (tmp_path / "outside").mkdir()
    written = [Path(f"{base}-{name}") for base in targets for name in ("open", "pathlib", "os.open", "mkdir")]
    written += [Path(f"{base}-{name}") for base in targets for name in ("symlink", "rename", "copy")]
    try:
        r = sandbox._execute(WRITE_ATTEMPTS.replace("TARGETS", repr(targets)), SandboxLimits(), guards=guards)
        assert r.status == "passed", r.stderr
        lines = r.stdout.splitlines()
        by = "by the guard" if guards else "by the OS"
        assert [line for line in lines[:-1] if not (line.startswith("blocked") and line.endswith(by))] == []
        assert len(lines) == 2 * 7 + 1, r.stdout
        assert [p for p in written if os.path.lexists(p)] == []
        cwd, home = lines[-1].split()
        assert home == cwd and not Path(cwd).exists()  # HOME was the throw-away directory, now deleted
    finally:
        for p in written:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            elif os.path.lexists(p):
                p.unlink()


def test_writes_outside_the_sandbox_directory_fail(tmp_path):
    attempt_writes(tmp_path, guards=True)


def test_writes_outside_the_sandbox_directory_fail_without_the_guards(tmp_path):
    require("separate_uid")
    attempt_writes(tmp_path, guards=False)


# ----------------------------------------------------------------------------------------------
# escapes: the network

CONNECT = """
import socket
for how in ("create_connection", "socket.connect"):
    try:
        if how == "socket.connect":
            s = socket.socket()
            s.settimeout(2)
            s.connect(("127.0.0.1", PORT))
        else:
            socket.create_connection(("127.0.0.1", PORT), timeout=2)
        print("connected", how)
    except OSError as e:
        print("blocked", how, type(e).__name__, e)
"""


def attempt_connection(guards: bool) -> str:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # the listener works: this connects
            listener.accept()[0].close()
        r = sandbox._execute(CONNECT.replace("PORT", str(port)), SandboxLimits(), guards=guards)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected from the sandbox
    assert r.status == "passed", r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["blocked", "blocked"], r.stdout
    return r.stdout


def test_network_connections_fail():
    assert "PermissionError" in attempt_connection(guards=True)


def test_network_connections_fail_without_the_guards():
    require("network_namespace")
    assert "Network is unreachable" in attempt_connection(guards=False)


# ----------------------------------------------------------------------------------------------
# escapes: processes (fork bombs, shells, libc)

PROCESS_TEMPLATE = """
import os
print(os.getpid(), flush=True)
try:
BODY
finally:
    print("made" if os.path.exists("made") else "not made")
"""
PYTHON_SLEEPER = "[sys.executable, '-c', 'import time; time.sleep(30)', 'MARKER']"
GUARDED_ESCAPES = {
    "fork bomb": ("while True:\n    os.fork()", "PermissionError: os.fork is disabled"),
    "forkpty": ("os.forkpty()", "PermissionError: os.forkpty is disabled"),
    "subprocess bomb": (
        f"import subprocess, sys\nwhile True:\n    subprocess.Popen({PYTHON_SLEEPER})",
        "PermissionError: subprocess is disabled",
    ),
    "multiprocessing bomb": (
        "import multiprocessing, time\nwhile True:\n    multiprocessing.Process(target=time.sleep, args=(30,)).start()",
        "PermissionError: os.fork is disabled",
    ),
    "posix_spawn": (f"import sys\nos.posix_spawn(sys.executable, {PYTHON_SLEEPER}, {{}})", "PermissionError"),
    "os.system": ("os.system('touch made')", "PermissionError: os.system is disabled"),
    "os.popen": ("os.popen('touch made').read()", "PermissionError: os.popen is disabled"),
    "os.execv": ("os.execv('/usr/bin/touch', ['touch', 'made'])", "PermissionError: os.execv is disabled"),
    "pty.spawn": ("import pty\npty.spawn(['touch', 'made'])", "PermissionError"),
    "ctypes": ("import ctypes\nctypes.CDLL(None).system(b'touch made')", "ImportError: import of ctypes is disabled"),
    "_ctypes": ("import _ctypes", "ImportError: import of _ctypes is disabled"),
    "cffi": ("import cffi", "ImportError: import of cffi is disabled"),
}
BARE_ESCAPES = {  # with the guards off, RLIMIT_NPROC=1 for a non-root child: the kernel refuses every fork
    "fork bomb": ("while True:\n    os.fork()", "BlockingIOError: [Errno 11] Resource temporarily unavailable"),
    "subprocess bomb": (
        f"import subprocess, sys\nwhile True:\n    subprocess.Popen({PYTHON_SLEEPER})",
        "BlockingIOError: [Errno 11] Resource temporarily unavailable",
    ),
    "os.system": ("print(os.system('touch made'))", ""),
    "libc system": ("import ctypes\nprint(ctypes.CDLL(None).system(b'touch made'))", ""),
}


def attempt_processes(body: str, error: str, guards: bool) -> None:
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    code = PROCESS_TEMPLATE.replace("BODY", textwrap.indent(body, "    ")).replace("MARKER", marker)
    r = sandbox._execute(code, SandboxLimits(timeout_s=3), guards=guards)
    assert (r.status, r.error.startswith(error)) == ("failed" if error else "passed", True), (r.error, r.stderr)
    assert r.stdout.splitlines()[-1] == "not made"
    assert survivors(int(r.stdout.split()[0]), marker) == []


@pytest.mark.parametrize("escape", GUARDED_ESCAPES)
def test_processes_and_libc_are_blocked(escape):
    attempt_processes(*GUARDED_ESCAPES[escape], guards=True)


@pytest.mark.parametrize("escape", BARE_ESCAPES)
def test_processes_are_blocked_without_the_guards(escape):
    require("nproc_limit")
    attempt_processes(*BARE_ESCAPES[escape], guards=False)


# ----------------------------------------------------------------------------------------------
# escapes: the evaluator's secrets and the evaluator itself


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("CHATLM_TEST_SECRET", "s3cr3t")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    r = run_code("import json, os, tempfile\nprint(json.dumps(dict(os.environ)))\nprint(tempfile.gettempdir())")
    env_line, tmpdir = r.stdout.splitlines()
    env = json.loads(env_line)
    assert r.status == "passed" and "s3cr3t" not in r.stdout and "sk-secret" not in r.stdout
    threads = {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", *threads} and env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == env["TMPDIR"] == tmpdir


def test_private_files_are_unreadable(tmp_path):
    require("restricted_reads")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    secret.chmod(0o600)
    r = run_code(f"print(open({str(secret)!r}).read())")
    assert (r.status, r.error.split(":")[0], r.stdout) == ("failed", "PermissionError", "")


READ_ENVIRONS = """
import os
for who, path in [("self", "/proc/self/environ"), ("parent", f"/proc/{os.getppid()}/environ")]:
    try:
        print(who, open(path, "rb").read())
    except OSError as e:
        print("blocked", who, type(e).__name__)
"""


def test_the_evaluators_proc_environ_is_unreadable():
    out = evaluate_elsewhere(READ_ENVIRONS, CHATLM_TEST_SECRET="s3cr3t")
    assert "CHATLM_TEST_SECRET=s3cr3t" in out["own_environ"]  # the secret is there to be stolen
    assert out["status"] == "passed" and "s3cr3t" not in out["output"]
    assert out["output"].splitlines() == ["blocked self PermissionError", "blocked parent PermissionError"]


def test_the_evaluators_proc_environ_is_unreadable_without_the_guards():
    require("separate_uid")
    out = evaluate_elsewhere(READ_ENVIRONS, guards=False, CHATLM_TEST_SECRET="s3cr3t")
    assert "CHATLM_TEST_SECRET=s3cr3t" in out["own_environ"]
    assert out["status"] == "passed" and "s3cr3t" not in out["output"]
    assert "blocked parent PermissionError" in out["output"].splitlines()


KILLS = {  # how -> (code, what the guard names)
    "kill": ("os.kill(os.getppid(), signal.SIGKILL)", "os.kill"),
    "killpg": ("os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)", "os.killpg"),
    "pidfd": ("signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)", "signal.pidfd_send_signal"),
    "kill everyone": ("os.kill(-1, signal.SIGKILL)", "os.kill"),
}


@pytest.mark.parametrize("how", ["kill", "killpg", "pidfd"])
def test_the_evaluator_survives_a_kill(how):
    code, refused = KILLS[how]
    out = evaluate_elsewhere(f"import os, signal\n{code}")  # asserts that the evaluator is alive
    assert (out["status"], out["error"]) == ("failed", f"PermissionError: {refused} is disabled in the sandbox")


@pytest.mark.parametrize("how", ["kill", "killpg", "pidfd", "kill everyone"])
def test_the_evaluator_survives_a_kill_without_the_guards(how):
    require("separate_uid")  # otherwise the kernel would let these through (and kill -1 would hit everything)
    out = evaluate_elsewhere(f"import os, signal\n{KILLS[how][0]}", guards=False)
    # kill(-1) reports success when every process it found was one it may not signal, so that one "passes"
    expected = (
        ("passed", "") if how == "kill everyone" else ("failed", "PermissionError: [Errno 1] Operation not permitted")
    )
    assert (out["status"], out["error"]) == expected, out
