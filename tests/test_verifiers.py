"""The code verifier's sandbox (``sdg/verifiers.py``: ``run_code``).

Escape attempts, each of which must fail inside the sandbox and leave no trace outside it;
the limits (time, memory, file size); the verdict (exit status 0 is not enough: the run's
nonce must come back, which the guard writes only once the tests have returned); correct
code still passing; and failing closed where bubblewrap is missing or broken. Tests that start the sandbox are in the slow tier (they
start processes); each run takes about 0.1 s. They skip only where bwrap cannot make a
sandbox here (CI installs bubblewrap: ``.ci/run``).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sdg import verifiers
from sdg.verifiers import (
    SandboxUnavailable,
    bubblewrap_problem,
    network_namespace_available,
    require_sandbox,
    run_code,
    seccomp_filter,
    verify_code,
)

REPO = Path(__file__).resolve().parents[1]
ESCAPED = "ESCAPED"  # what an attempt prints once it got through


@pytest.fixture
def bubblewrap():
    """Skips the test where bwrap cannot make a sandbox here (probed once per session)."""
    if (problem := bubblewrap_problem()) is not None:
        pytest.skip(f"no bubblewrap sandbox here: {problem}")


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that records whether anyone connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    yield server
    server.close()


def _assert_nobody_connected(server):
    with pytest.raises(socket.timeout):
        server.accept()


def _attempt(code: str, **limits):
    """Run an escape attempt; it must fail (an exception), never print ESCAPED."""
    result = run_code(textwrap.dedent(code), **limits)
    assert not result.passed and ESCAPED not in result.stdout, (result.stdout, result.stderr)
    assert result.seconds < 2 and not result.timed_out, result
    return result


# --------------------------------------------------------------------------------------
# Code that should run, runs
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # the sandbox's processes
def test_code_that_passes_or_fails_its_tests(bubblewrap):
    solution = "```python\ndef double(x):\n    return 2 * x\n```"
    passing = verify_code(solution, "assert double(3) == 6")
    assert passing.passed and passing.seconds < 1, passing
    failing = verify_code(solution, "assert double(3) == 7")
    assert not failing.passed and "AssertionError" in failing.stderr
    assert not verify_code("```python\ndef broken(:\n```").passed


@pytest.mark.slow  # the sandbox's processes
def test_the_standard_library_threads_and_the_work_folder_work(bubblewrap):
    code = """
        import collections, decimal, fractions, hashlib, json, re, zoneinfo
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda x: x * x, range(5))) == [0, 1, 4, 9, 16]
        with open("scratch.txt", "w") as f:  # the work folder is writable (and private)
            f.write("kept")
        assert open("scratch.txt").read() == "kept"
        print(hashlib.sha256(b"x").hexdigest()[:8], fractions.Fraction(3, 4), os.getcwd())
    """
    result = run_code("import os\n" + textwrap.dedent(code))
    assert result.passed, result.stderr
    assert result.stdout.split() == ["2d711642", "3/4", verifiers.WORK_FOLDER]


# --------------------------------------------------------------------------------------
# The verdict: exit status 0 and the nonce the guard writes once the tests have returned
# --------------------------------------------------------------------------------------

DOUBLE = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(3) == 6\nassert double(-1) == -2\n"


@pytest.fixture(params=["bubblewrap", "weak"])
def sandbox(request):
    """Each sandbox in turn (bubblewrap skips where bwrap cannot make a sandbox here)."""
    if request.param == "bubblewrap" and (problem := bubblewrap_problem()) is not None:
        pytest.skip(f"no bubblewrap sandbox here: {problem}")
    return request.param


def _not_completed(result):
    """Exit status 0, yet failed, saying why (the last line of stderr is what a verdict records)."""
    return (not result.passed and result.returncode == 0 and not result.timed_out
            and result.stderr.strip().splitlines()[-1] == verifiers.NOT_COMPLETED)


@pytest.mark.slow  # the sandbox's processes
@pytest.mark.parametrize("ending", [
    "import os\nos._exit(0)",  # before the tests: no cleanup, no exception, status 0
    "import sys\nsys.exit(0)",
    "raise SystemExit(0)",
    "import sys\nsys.stdout.flush()\nsys.exit()",
    "import atexit, os\natexit.register(os._exit, 0)\nraise RuntimeError('never mind the tests')",
])
def test_code_that_exits_0_before_its_tests_fails(sandbox, ending):
    assert run_code(DOUBLE, TESTS, sandbox=sandbox).passed  # the same code, without the ending, passes
    result = run_code(DOUBLE + ending, TESTS, sandbox=sandbox)
    assert _not_completed(result), result


@pytest.mark.slow  # the sandbox's processes
def test_an_exit_from_inside_a_tested_function_fails(sandbox):
    code = "import os, sys\ndef double(x):\n    sys.exit(0)\ndef triple(x):\n    os._exit(0)\n"
    assert _not_completed(run_code(code, "assert double(3) == 6", sandbox=sandbox))
    assert _not_completed(run_code(code, "assert triple(3) == 9", sandbox=sandbox))
    # Swallowing the SystemExit is up to the tests: here they catch it, and fail on their own.
    failing = run_code(code, "try:\n    double(3)\nexcept SystemExit:\n    pass\nassert False", sandbox=sandbox)
    assert not failing.passed and failing.returncode == 1 and "AssertionError" in failing.stderr


@pytest.mark.slow  # the sandbox's processes
def test_correct_code_passes_and_wrong_code_fails(sandbox):
    passing = run_code(DOUBLE, TESTS, sandbox=sandbox)
    assert passing.passed and passing.returncode == 0 and verifiers.NOT_COMPLETED not in passing.stderr, passing
    wrong = run_code("def double(x):\n    return x + 2\n", TESTS, sandbox=sandbox)
    assert not wrong.passed and wrong.returncode == 1 and "AssertionError" in wrong.stderr
    assert run_code("print('no tests: the code runs to its end')", sandbox=sandbox).passed
    assert not run_code(DOUBLE, "assert double(3) == 6\nraise ValueError", sandbox=sandbox).passed


@pytest.mark.slow  # the sandbox's processes
def test_a_guessed_nonce_does_not_pass(sandbox):
    """A nonce-like line on stdout, and on every descriptor the code could write to, then exit 0."""
    code = """
        import os, secrets
        guess = secrets.token_hex(32)
        print(guess, flush=True)
        for fd in range(3, 64):
            for attempt in (guess.encode(), (guess + "\\n").encode()):
                try:
                    os.write(fd, attempt)
                except OSError:
                    pass
        os._exit(0)
    """
    result = run_code(DOUBLE + textwrap.dedent(code), TESTS, sandbox=sandbox)
    assert _not_completed(result), result
    assert len(result.stdout.strip()) == 64


@pytest.mark.slow  # the sandbox's processes
def test_the_nonce_is_nowhere_the_code_can_read(sandbox, monkeypatch):
    """Not in argv, the environment, the files of the work folder (or the guard), nor on any
    descriptor: the code prints everything it finds, and a known nonce must not be in it."""
    known = "5ec7e7" * 10 + "abcd"
    drawn = []
    monkeypatch.setattr(verifiers.secrets, "token_hex", lambda n: drawn.append(n) or known)
    code = """
        import os, sys
        found = [repr(sys.argv), repr(dict(os.environ)), repr(sys.orig_argv)]
        for folder in (".", "/verifier"):
            for name in (os.listdir(folder) if os.path.isdir(folder) else []):
                with open(os.path.join(folder, name), "rb") as f:
                    found.append(repr(f.read()))
        for path in ("/proc/self/cmdline", "/proc/self/environ"):
            try:
                found.append(repr(open(path, "rb").read()))
            except OSError:
                pass
        for fd in range(3, 64):
            try:
                found.append(repr(os.read(fd, 4096)))
            except OSError:
                pass
        print("\\n".join(found))
    """
    result = run_code(textwrap.dedent(code), sandbox=sandbox)
    assert drawn == [32] and result.passed, result  # the known nonce was the run's, and it came back
    assert "found = [repr(sys.argv)" in result.stdout  # it did read the work folder's files (its own code)
    assert known not in result.stdout, result.stdout[:2000]


@pytest.mark.slow  # the sandbox's processes
def test_the_code_cannot_rewrite_its_tests(sandbox):
    """Both files are read (and compiled) before the code runs: rewriting tests.py changes nothing."""
    code = DOUBLE.replace("2 * x", "x + 2") + "open('tests.py', 'w').write('pass\\n')\n"
    result = run_code(code, TESTS, sandbox=sandbox)
    assert not result.passed and result.returncode == 1 and "AssertionError" in result.stderr, result


# --------------------------------------------------------------------------------------
# Escape attempts
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # the sandbox's processes
@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/shadow", "/root/.bashrc", str(REPO / "pyproject.toml"),
                                  sys.prefix + "/pyvenv.cfg", "/proc/self/environ", "/sys/kernel/notes"])
def test_files_outside_the_work_folder_cannot_be_read(bubblewrap, path):
    result = _attempt(f"print(open({path!r}).read()[:100])\nprint({ESCAPED!r})")
    assert "FileNotFoundError" in result.stderr


@pytest.mark.slow  # the sandbox's processes
def test_a_secret_file_and_its_folder_cannot_be_read(bubblewrap, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-token")
    result = _attempt(f"""
        import os
        try:
            print(os.listdir({str(tmp_path)!r}))
        except FileNotFoundError:
            pass
        print(open({str(secret)!r}).read())
        print({ESCAPED!r})
    """)
    assert "s3cr3t-token" not in result.stdout + result.stderr and "secret.txt" not in result.stdout


@pytest.mark.slow  # the sandbox's processes
def test_nothing_outside_the_work_folder_can_be_written(bubblewrap, tmp_path):
    targets = [tmp_path / "written", Path("/tmp") / f"sdg-escape-{uuid.uuid4().hex}",
               REPO / f"sdg-escape-{uuid.uuid4().hex}"]
    for target in targets:
        result = _attempt(f"open({str(target)!r}, 'w').write('x')\nprint({ESCAPED!r})")
        assert "FileNotFoundError" in result.stderr or "Read-only file system" in result.stderr
        assert not target.exists()
    for inside in ("/written", "/usr/lib/written", sys.base_prefix + "/written", "/dev/written"):
        result = _attempt(f"open({inside!r}, 'w').write('x')\nprint({ESCAPED!r})")
        assert "Read-only file system" in result.stderr, result.stderr


@pytest.mark.slow  # the sandbox's processes
def test_shell_commands_through_ctypes_do_not_run(bubblewrap, tmp_path):
    """libc's system() past any Python-level hook: no process can be made (and no shell is there)."""
    pwned = tmp_path / "pwned"
    result = _attempt(f"""
        import ctypes
        status = ctypes.CDLL(None).system(b"touch {pwned}")
        assert status == 0, f"system() returned {{status}}"
        print({ESCAPED!r})
    """)
    assert "system() returned" in result.stderr
    assert not pwned.exists()


@pytest.mark.slow  # the sandbox's processes
def test_exec_is_denied_even_of_the_interpreter(bubblewrap, tmp_path):
    """The interpreter is in the sandbox, so only seccomp stops exec'ing it (os.execv, or libc's)."""
    pwned = tmp_path / "pwned"
    payload = f"open({str(pwned)!r}, 'w')"
    result = _attempt(f"""
        import os, sys
        os.execv(sys.executable, [sys.executable, "-c", {payload!r}])
    """)
    assert "PermissionError" in result.stderr and "Operation not permitted" in result.stderr
    result = _attempt(f"""
        import ctypes, sys
        libc = ctypes.CDLL(None, use_errno=True)
        argv = (ctypes.c_char_p * 4)(sys.executable.encode(), b"-c", {payload.encode()!r}, None)
        libc.execv(sys.executable.encode(), argv)
        raise OSError(ctypes.get_errno(), "execv failed")
    """)
    assert "[Errno 1] execv failed" in result.stderr
    assert not pwned.exists()


@pytest.mark.slow  # the sandbox's processes
def test_no_process_can_be_started(bubblewrap, tmp_path):
    pwned = tmp_path / "pwned"
    fork = _attempt(f"import os\npid = os.fork()\nprint({ESCAPED!r})")
    assert "PermissionError" in fork.stderr
    libc_fork = _attempt(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        pid = libc.fork()
        if pid == 0:
            os._exit(0)
        if pid < 0:
            raise OSError(ctypes.get_errno(), "fork failed")
        print({ESCAPED!r})
    """)
    assert "[Errno 1] fork failed" in libc_fork.stderr
    spawn = _attempt(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", "open({pwned}, 'w')"])
        print({ESCAPED!r})
    """)
    assert "PermissionError" in spawn.stderr
    system = _attempt(f"import os\nassert os.system('touch {pwned}') == 0\nprint({ESCAPED!r})")
    assert "AssertionError" in system.stderr
    assert not pwned.exists()


@pytest.mark.slow  # the sandbox's processes
def test_no_socket_reaches_a_server_on_this_machine(bubblewrap, listener):
    port = listener.getsockname()[1]
    result = _attempt(f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
        print({ESCAPED!r})
    """)
    assert "PermissionError" in result.stderr
    _assert_nobody_connected(listener)
    by_url = _attempt(f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}', timeout=1)\n"
                      f"print({ESCAPED!r})")
    assert "Operation not permitted" in by_url.stderr
    _assert_nobody_connected(listener)
    # libc's own socket() and connect(), past anything Python could hook.
    sockaddr = struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1"))
    sockaddr = struct.pack("=H", socket.AF_INET) + sockaddr[2:]  # sa_family is host order
    raw = _attempt(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(2, 1, 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "socket failed")
        addr = ctypes.create_string_buffer({sockaddr!r}, {len(sockaddr)})
        assert libc.connect(fd, addr, {len(sockaddr)}) == 0, ctypes.get_errno()
        print({ESCAPED!r})
    """)
    assert "[Errno 1] socket failed" in raw.stderr
    _assert_nobody_connected(listener)


@pytest.mark.slow  # the sandbox's processes
def test_process_memory_cannot_be_written(bubblewrap):
    """No /proc in the sandbox: /proc/self/mem (which writes past page protections) is not there."""
    result = _attempt(f"open('/proc/self/mem', 'r+b')\nprint({ESCAPED!r})")
    assert "FileNotFoundError" in result.stderr
    ptrace = _attempt(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, 1, None, None) != 0:  # PTRACE_ATTACH to the sandbox's init
            raise OSError(ctypes.get_errno(), "ptrace failed")
        print({ESCAPED!r})
    """)
    assert "[Errno 1] ptrace failed" in ptrace.stderr


@pytest.mark.slow  # the sandbox's processes
def test_no_new_namespace_or_mount(bubblewrap):
    """unshare(CLONE_NEWUSER) would give the code capabilities of its own; mount() needs them."""
    result = _attempt(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")
        print({ESCAPED!r})
    """)
    assert "[Errno 1] unshare failed" in result.stderr
    mount = _attempt(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"none", b"/sandbox", b"tmpfs", 0, None) != 0:
            raise OSError(ctypes.get_errno(), "mount failed")
        print({ESCAPED!r})
    """)
    assert "[Errno 1] mount failed" in mount.stderr


@pytest.mark.slow  # the sandbox's processes
def test_processes_outside_cannot_be_signalled(bubblewrap):
    result = _attempt(f"import os\nos.kill({os.getpid()}, 0)\nprint({ESCAPED!r})")
    assert "ProcessLookupError" in result.stderr


@pytest.mark.slow  # the sandbox's processes
def test_the_environment_holds_no_secret(bubblewrap, monkeypatch):
    monkeypatch.setenv("FACTORY_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-either")
    result = run_code("import json, os\nprint(json.dumps(dict(os.environ)))")
    assert result.passed, result.stderr
    env = json.loads(result.stdout)
    assert "do-not-leak" not in result.stdout and "FACTORY_TEST_SECRET" not in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}, env


# --------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # the sandbox's processes
def test_an_infinite_loop_is_stopped(bubblewrap):
    start = time.monotonic()
    result = run_code("while True:\n    pass", timeout_s=0.5)
    assert time.monotonic() - start < 3
    assert result.timed_out and not result.passed


@pytest.mark.slow  # the sandbox's processes
def test_a_sleeping_program_and_its_threads_do_not_outlive_the_timeout(bubblewrap):
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\ntime.sleep(60)"
    result = run_code(code, timeout_s=0.5)
    assert result.timed_out and result.seconds < 2


@pytest.mark.slow  # the sandbox's processes
def test_memory_and_file_size_are_limited(bubblewrap):
    big = run_code("x = bytearray(1024 * 1024 * 1024)", memory_mb=256)
    assert not big.passed and "MemoryError" in big.stderr
    huge_file = run_code("open('big', 'wb').write(b'x' * (32 << 20))")
    assert not huge_file.passed and "File too large" in huge_file.stderr


# --------------------------------------------------------------------------------------
# Failing closed
# --------------------------------------------------------------------------------------


def test_without_bwrap_the_code_does_not_run_and_the_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(SandboxUnavailable) as error:
        run_code("print('ran')")
    message = str(error.value)
    assert "`bwrap`) is not installed" in message and "apt-get install bubblewrap" in message
    assert "sandbox: weak" in message and "user namespaces" in message


@pytest.mark.slow  # the weak sandbox's process
def test_the_weak_sandbox_runs_without_bwrap_and_still_refuses_python_level_sockets(monkeypatch, tmp_path,
                                                                                   listener):
    monkeypatch.setenv("PATH", str(tmp_path))
    require_sandbox("weak")  # no error
    assert run_code("print('ran')", sandbox="weak").stdout == "ran\n"
    port = listener.getsockname()[1]
    result = run_code(f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))", sandbox="weak")
    assert not result.passed and "sandbox: socket.__new__ is not allowed" in result.stderr
    _assert_nobody_connected(listener)
    if not network_namespace_available():  # then ctypes, which could reach libc's socket(), is refused
        assert "ctypes" in run_code("import ctypes", sandbox="weak").stderr


@pytest.mark.slow  # the fake bwrap is a process
def test_a_bwrap_that_cannot_make_namespaces_is_refused_with_its_error(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="cannot make the sandbox here: bwrap: setting up uid map"):
        run_code("print('ran')")


def test_a_recipe_validates_without_bwrap_but_its_sdg_run_fails_before_generating(monkeypatch, tmp_path):
    """`factory validate` needs no bwrap; the SDG stage with code problems checks it before
    anything is generated (an unreachable endpoint would otherwise fail first, differently)."""
    from flows.recipe import parse_recipe  # what `factory validate` runs
    from model.contract import StageContext
    from sdg import sdg_stage
    from store.local import LocalStore

    monkeypatch.setenv("PATH", str(tmp_path))
    problems = tmp_path / "code.jsonl"
    problems.write_text(json.dumps({"question": "Write add(a, b).", "tests": "assert add(1, 2) == 3"}) + "\n")
    sdg = {"generator": {"endpoint": "http://127.0.0.1:9/v1"}, "code": {"problems_file": str(problems)}}
    recipe = parse_recipe({"name": "x", "sdg": sdg})
    assert recipe.sdg.verify.sandbox == "bubblewrap"
    store = LocalStore(tmp_path / "store")
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        sdg_stage.run(recipe.sdg, {}, store, StageContext("x"))
    assert not list((tmp_path / "store").rglob("*.jsonl"))  # no record of any generation
    weak = parse_recipe({"name": "x", "sdg": sdg | {"verify": {"sandbox": "weak"}}})
    assert weak.sdg.verify.sandbox == "weak"
    with pytest.raises(ValueError, match="network_namespace is gone"):
        parse_recipe({"name": "x", "sdg": sdg | {"verify": {"network_namespace": "on"}}})


# --------------------------------------------------------------------------------------
# The seccomp program
# --------------------------------------------------------------------------------------


def test_seccomp_system_call_numbers_match_libseccomp():
    """The hand-written tables against libseccomp's (where this machine has the library)."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("no libseccomp here to check the tables against")
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    tables = {**verifiers._DENIED_SYSCALLS, **verifiers._EXEC_SYSCALLS, "clone": verifiers._CLONE,
              "clone3": verifiers._CLONE3}
    for machine, (column, audit_arch) in verifiers._ARCHITECTURES.items():
        for syscall, numbers in tables.items():
            number = lib.seccomp_syscall_resolve_name_arch(audit_arch, syscall.encode())
            assert numbers[column] == (number if number >= 0 else None), (machine, syscall)


def test_seccomp_filter_shape():
    for machine in ("x86_64", "aarch64"):
        program = seccomp_filter(machine)
        assert len(program) % 8 == 0 and len(program) // 8 < 4096
        assert len(seccomp_filter(machine, deny_exec=False)) == len(program) - 2 * 2 * 8  # execve, execveat
    with pytest.raises(SandboxUnavailable, match="no seccomp filter for the riscv64 architecture"):
        seccomp_filter("riscv64")
