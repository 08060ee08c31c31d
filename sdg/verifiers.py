"""Programmatic verifiers: instruction constraints, math answers, code in a sandbox.

Where a verifier exists it outranks every scorer (Nemotron-4 340B ranks preference pairs
by ground truth or a verifier first, then by a judge or reward model).

- **Constraints** (IFEval-style, Zhou et al. 2023): each kind has its instruction wording
  and its check side by side in ``CONSTRAINTS``, so the prompt and the test cannot drift.
- **Math**: the response's final answer (``\\boxed{}``, ``####``, "Answer:", last number)
  against the ground truth by math-verify (Hugging Face's checker: LaTeX and plain
  expressions parsed to SymPy, then compared numerically and symbolically: ``\\frac{3}{4}``
  equals ``0.75``, ``\\{3,2,1\\}`` equals ``\\{1,2,3\\}``, ``2(x+1)`` equals ``2x+2``); string
  matching only where math-verify finds no expression on either side.
- **Code** (``run_code``): model-written code is untrusted, so it runs under bubblewrap
  (``bwrap``) and seccomp, with resource limits; the sandbox is probed once and, where it
  cannot be made, nothing runs (``SandboxUnavailable``, saying what to install) unless the
  recipe chose ``verify.sandbox: weak``.

  *Namespaces* (``--unshare-all``): a user namespace of its own where the kernel allows one
  (uid 65534; no further user namespace where bwrap has ``--disable-userns``), every
  capability dropped, a network namespace with only a loopback that is down (no network at
  all), a PID namespace (it sees and can signal only its own processes), IPC, UTS and cgroup;
  a new session (no ``TIOCSTI`` on the caller's terminal); it dies with the caller.

  *Files*: an empty root, read-only, with only what the interpreter needs bound read-only:
  ``/usr/lib*`` and ``/lib*`` (shared libraries), ``/usr/share/zoneinfo``, and the base
  interpreter's installation (its standard library and its own site-packages; not the venv,
  so not the project's dependencies). No ``/etc``, ``/home``, ``/root`` (beyond the path down
  to the interpreter), ``/tmp``, ``/proc`` (so no ``/proc/self/mem``), ``/sys`` or working
  tree; ``/dev`` holds null, zero, full, random and urandom. The only writable place is a
  private tmpfs (64 MiB where bwrap has ``--size``, 0.8+), ``/sandbox`` (the working folder,
  ``HOME`` and ``TMPDIR``), which holds the code and its tests and vanishes with the run. The
  environment is cleared, then only ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG`` are set; the
  code's only open file descriptors are 0 (``/dev/null``), 1 and 2 (pipes to the caller) and
  the write end of the completion pipe (*The verdict*, below).

  *seccomp* (a BPF program assembled here, ``seccomp_filter``; x86_64 and aarch64): bwrap
  loads it before starting the interpreter, and the guard run before the code adds it again
  with ``execve``/``execveat`` denied too (a filter cannot be removed; if it cannot be
  installed the code does not run). Denied with EPERM: exec, ``fork``/``vfork`` and ``clone``
  of anything but a thread (``clone3``: ENOSYS, so libc falls back to ``clone``), sockets of
  every family, ``ptrace``, ``process_vm_readv/writev``, ``mount`` and the new mount API,
  ``unshare``/``setns``, ``bpf``, ``perf_event_open``, ``userfaultfd``, io_uring, keyrings,
  modules, kexec, reboot, swap, clock setting, ``personality`` and a few more; another
  architecture's system calls (i386, x32) kill the process. So ``ctypes`` is no way out:
  ``libc.system()``, ``fork()``, ``socket()`` or ``execv()`` fail as ``os.system`` does.

  *Limits*: CPU time (the wall-clock limit, rounded up), wall time (the process group is
  killed, and with it the sandbox's PID namespace), address space, 16 MiB per file, 64 open
  files, no core dump. There is no RLIMIT_NPROC: it counts all the user's processes, and
  seccomp already stops new processes (threads are allowed).

  What it does not protect against: a kernel bug reachable through the system calls still
  allowed (this is a deny list, not an allow list: the kernel is the boundary, as in a
  container); reading what is bound (system libraries, the interpreter's installation with
  its site-packages); using its limits in full (CPU, memory, threads, 64 MiB of tmpfs).

  *The verdict* (both sandboxes): passed means exit status 0 in time *and* evidence that the
  tests ran to completion, since an exit status alone is easy to fake (``os._exit(0)``,
  ``sys.exit(0)`` or ``raise SystemExit(0)`` before the tests, at import or inside a tested
  function). For each run the caller draws a random nonce (256 bits, ``secrets``) and hands it
  to the guard on a pipe, which the guard reads and closes before any of the response's code
  runs: the nonce is in no code text, argument, environment variable, file or descriptor the
  code can read, and lives on only in a closure of the guard. The guard compiles the code
  (``solution.py``) and the tests (``tests.py``) apart, so nothing in the code's syntax can
  swallow the tests, runs the two in one namespace, and only when the tests have returned
  writes the nonce to a second pipe (the code's one extra descriptor, a write end). The caller
  requires exactly that nonce there: code that ends the process early leaves nothing, and
  code that prints or writes a guessed nonce leaves the wrong bytes. What this is not: a secret
  against code written to dig the nonce out of its own interpreter (frame or ``gc``
  introspection, ``ctypes`` reading memory), which shares the guard's process; nor a check
  that the tests test anything (an object equal to everything passes ``assert f(x) == y``).

  ``sandbox="weak"`` (for trusted code on a machine without bubblewrap) gives up all of the
  above but the limits and the empty environment: a ``python -I`` subprocess in a temporary
  folder, with a PEP 578 audit hook that refuses Python-level sockets, subprocesses,
  ``os.system``/``exec``/``fork``/``kill``, and a network namespace where ``unshare -rn``
  works (without one ``ctypes`` is refused too, and packages that need it). The code can read
  and write every file the factory's user can, and native code (``ctypes``) gets past the hook.
"""

from __future__ import annotations

import errno
import functools
import hmac
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from random import Random

from sdg.parsing import extract_code, final_answer, normalize_answer

# --------------------------------------------------------------------------------------
# Instruction constraints
# --------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _strip_fences(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^```(?:json)?\s*\n?", "", text, flags=re.IGNORECASE)
    return re.sub(r"\n?```$", "", text).strip()


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fences(text))
    except json.JSONDecodeError:
        return False
    return True


END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.")


@dataclass(frozen=True)
class Constraint:
    """One kind of verifiable instruction: how to pick its parameters, word it, check it."""

    params: object  # (rng, prompt text) -> dict
    describe: object  # params -> the instruction appended to the prompt
    check: object  # (response, params) -> bool


def _keywords_from(rng: Random, prompt: str) -> dict:
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{5,}", prompt)})
    pool = words if len(words) >= 2 else ["example", "because"]
    return {"keywords": rng.sample(pool, 2)}


CONSTRAINTS: dict[str, Constraint] = {
    "min_words": Constraint(
        lambda rng, p: {"n": rng.choice([20, 50, 100])},
        lambda c: f"Answer with at least {c['n']} words.",
        lambda r, c: len(_words(r)) >= c["n"]),
    "max_words": Constraint(
        lambda rng, p: {"n": rng.choice([20, 50, 100])},
        lambda c: f"Answer with at most {c['n']} words.",
        lambda r, c: 0 < len(_words(r)) <= c["n"]),
    "paragraphs": Constraint(
        lambda rng, p: {"n": rng.choice([2, 3, 4])},
        lambda c: f"Your response should contain exactly {c['n']} paragraphs, separated by a blank line.",
        lambda r, c: len(_paragraphs(r)) == c["n"]),
    "keywords": Constraint(
        _keywords_from,
        lambda c: "Include the keywords " + " and ".join(repr(k) for k in c["keywords"]) + " in your response.",
        lambda r, c: all(re.search(rf"\b{re.escape(k)}\b", r, re.IGNORECASE) for k in c["keywords"])),
    "no_commas": Constraint(
        lambda rng, p: {},
        lambda c: "Do not use any commas in your response.",
        lambda r, c: bool(r.strip()) and "," not in r),
    "lowercase": Constraint(
        lambda rng, p: {},
        lambda c: "Your entire response should be in English and in all lowercase letters. No capital letters are allowed.",
        lambda r, c: any(ch.isalpha() for ch in r) and r == r.lower()),
    "uppercase": Constraint(
        lambda rng, p: {},
        lambda c: "Your entire response should be in English and in all capital letters.",
        lambda r, c: any(ch.isalpha() for ch in r) and r == r.upper()),
    "end_phrase": Constraint(
        lambda rng, p: {"phrase": rng.choice(END_PHRASES)},
        lambda c: f"Finish your response with this exact phrase: {c['phrase']} No other words should follow it.",
        lambda r, c: r.strip().endswith(c["phrase"])),
    "quotation": Constraint(
        lambda rng, p: {},
        lambda c: "Wrap your entire response with double quotation marks.",
        lambda r, c: len(r.strip()) > 2 and r.strip()[0] == '"' and r.strip()[-1] == '"'),
    "bullets": Constraint(
        lambda rng, p: {"n": rng.choice([2, 3, 4])},
        lambda c: f"Your answer must contain exactly {c['n']} bullet points, in markdown: * This is a point.",
        lambda r, c: len(re.findall(r"^\s*[*-]\s+\S", r, re.MULTILINE)) == c["n"]),
    "title": Constraint(
        lambda rng, p: {},
        lambda c: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        lambda r, c: re.search(r"<<[^<>\n]+>>", r) is not None),
    "json": Constraint(
        lambda rng, p: {},
        lambda c: "Wrap your entire output in JSON format. You may use markdown ticks such as ```.",
        lambda r, c: _is_json(r)),
}


def make_constraint(kind: str, rng: Random, prompt: str) -> dict:
    """A constraint record: ``{"kind": ..., **params, "instruction": ...}``."""
    constraint = CONSTRAINTS[kind]
    params = constraint.params(rng, prompt)
    return {"kind": kind, **params, "instruction": constraint.describe(params)}


def check_constraints(response: str, constraints: list[dict]) -> dict[str, bool]:
    """kind -> whether the response satisfies it."""
    return {c["kind"]: bool(CONSTRAINTS[c["kind"]].check(response, c)) for c in constraints}


# --------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------


MATH_VERIFY_TIMEOUT_S = 5  # per parse and per comparison (SymPy can take unbounded time on hostile input)
MATH_VERIFY_MAX_CHARS = 1000  # a final answer longer than this is not parsed (off the main thread: no timeout)


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("sdg: math answers are checked with math-verify, which is not installed: "
                          "pip install 'math-verify[antlr4_13_2]' (a dependency of this project: "
                          "pip install -e .)") from e
    return math_verify


def math_checker_version() -> str:
    """What checks math answers, for the verdicts' record keys: a new math-verify judges again."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"math-verify {version('math-verify')}, latex2sympy2_extended {version('latex2sympy2_extended')}"
    except PackageNotFoundError:
        _math_verify()  # the error that says what to install
        raise


def _timeout_s() -> int | None:
    """math-verify times out with SIGALRM, which only the main thread may set: elsewhere (a
    Prefect task's worker thread, a thread pool) no timeout, and long answers are not parsed."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_math(answer: str, timeout_s: int | None) -> list:
    mv = _math_verify()
    text = answer.strip()
    if not text or len(text) > MATH_VERIFY_MAX_CHARS:
        return []
    if not (text.startswith("$") and text.endswith("$") and len(text) > 1):
        text = f"${text}$"  # the final answer as an inline formula: LaTeX or a plain expression
    return mv.parse(text, extraction_config=[mv.LatexExtractionConfig(), mv.ExprExtractionConfig()],
                    parsing_timeout=timeout_s)


def math_equal(got: str, expected: str) -> bool | None:
    """Whether two final answers are the same mathematical object (math-verify), or None when
    either side parses to nothing it can compare."""
    timeout_s = _timeout_s()
    gold, pred = _parse_math(expected, timeout_s), _parse_math(got, timeout_s)
    if not gold or not pred:
        return None
    return bool(_math_verify().verify(gold, pred, timeout_seconds=timeout_s))


def _string_equal(got: str, expected: str) -> bool:
    a, b = normalize_answer(got), normalize_answer(expected)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def answer_matches(response: str, truth: str) -> bool:
    """The response's final answer equals the ground truth (a bare answer, or a solution
    ending in ``#### x`` / ``\\boxed{x}``), as math-verify compares them (fractions,
    decimals, percentages, LaTeX, sets, intervals, equivalent expressions); where math-verify
    finds no expression, normalized strings (numbers with a relative tolerance of 1e-6)."""
    got = final_answer(response)
    if got is None:
        return False
    expected = final_answer(truth) if re.search(r"####|\\boxed", truth) else truth
    if not expected:
        return False
    same = math_equal(got, expected)
    return _string_equal(got, expected) if same is None else same


# --------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------

SANDBOXES = ("bubblewrap", "weak")
OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept
WORK_FOLDER = "/sandbox"  # inside the sandbox: a private tmpfs, the only writable place
WORK_FOLDER_BYTES = 64 << 20  # its size, where bwrap can set one (``--size``, bubblewrap 0.8+)
SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace


class SandboxUnavailable(RuntimeError):
    """The code sandbox the recipe asks for cannot be made on this machine."""


@dataclass
class CodeResult:
    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----- seccomp: a classic BPF program, assembled here (no library needed)

# Denied with EPERM. Numbers per architecture (x86_64, aarch64), checked against libseccomp's
# tables by tests/test_verifiers.py; None: the call does not exist there.
_DENIED_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None),  # new processes (clone without CLONE_THREAD: below)
    "socket": (41, 198), "socketpair": (53, 199),  # no socket of any family
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "pidfd_getfd": (438, 438), "userfaultfd": (323, 282), "personality": (135, 92),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "unshare": (272, 97), "setns": (308, 268),
    "bpf": (321, 280), "perf_event_open": (298, 241), "fanotify_init": (300, 262),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60), "syslog": (103, 116),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "iopl": (172, None), "ioperm": (173, None), "modify_ldt": (154, None), "uselib": (134, None),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171),
    "sethostname": (170, 161), "setdomainname": (171, 162),
}
# Denied only once the interpreter runs (bwrap itself must still exec it).
_EXEC_SYSCALLS = {"execve": (59, 221), "execveat": (322, 281)}
_CLONE, _CLONE3 = (56, 220), (435, 435)  # clone: threads only; clone3: ENOSYS, so libc falls back to clone
_ARCHITECTURES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # machine -> (column, AUDIT_ARCH_*)
_CLONE_THREAD = 0x00010000
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_J*|BPF_K, BPF_RET|BPF_K


def seccomp_filter(machine: str, deny_exec: bool = True) -> bytes:
    """The sandbox's seccomp program for ``machine`` (``platform.machine()``): an array of
    ``struct sock_filter``, as ``prctl(PR_SET_SECCOMP)`` and ``bwrap --seccomp`` take it.

    Another architecture's system calls (i386 or x32 on x86_64) kill the process; the calls in
    ``_DENIED_SYSCALLS`` (and ``execve``/``execveat`` with ``deny_exec``) fail with EPERM;
    ``clone`` only makes threads; ``clone3`` fails with ENOSYS; everything else is allowed."""
    import struct

    if machine not in _ARCHITECTURES:
        raise SandboxUnavailable(f"no seccomp filter for the {machine} architecture (only "
                                 f"{', '.join(_ARCHITECTURES)})")
    column, audit_arch = _ARCHITECTURES[machine]
    op = lambda code, k, jt=0, jf=0: struct.pack("=HBBI", code, jt, jf, k)
    program = [op(_LD_ABS_W, 4), op(_JEQ, audit_arch, 1, 0), op(_RET, _RET_KILL_PROCESS), op(_LD_ABS_W, 0)]
    if machine == "x86_64":  # x32 system calls carry the same AUDIT_ARCH: refuse the whole range
        program += [op(_JGE, 0x40000000, 0, 1), op(_RET, _RET_KILL_PROCESS)]
    denied = {**_DENIED_SYSCALLS, **(_EXEC_SYSCALLS if deny_exec else {})}
    for numbers in denied.values():
        if numbers[column] is not None:
            program += [op(_JEQ, numbers[column], 0, 1), op(_RET, _RET_ERRNO | errno.EPERM)]
    program += [op(_JEQ, _CLONE3[column], 0, 1), op(_RET, _RET_ERRNO | errno.ENOSYS),
                op(_JEQ, _CLONE[column], 0, 3),
                op(_LD_ABS_W, 16),  # the low half of args[0], clone's flags (both architectures: little-endian)
                op(_JSET, _CLONE_THREAD, 1, 0),
                op(_RET, _RET_ERRNO | errno.EPERM),
                op(_RET, _RET_ALLOW)]
    return b"".join(program)


# ----- bubblewrap

# Runs last in both guards (argv: the nonce's pipe, the completion pipe): the response's code,
# then its tests, and the evidence that they ran to completion (the module's docstring, *The
# verdict*). The nonce is read, and its pipe closed, before the code runs; only the closure
# ``done`` holds it, and ``done`` is called only when the tests have returned: an exception,
# SystemExit or os._exit on the way skips it.
_HARNESS = r'''

def _run_to_completion(nonce_fd, done_fd):
    import os

    def sealed():
        nonce, write = os.read(nonce_fd, 256), os.write
        os.close(nonce_fd)
        return lambda: write(done_fd, nonce)

    done, run, programs = sealed(), exec, []
    for name in ("solution.py", "tests.py"):  # both compiled (and read) before either runs
        with open(name) as f:
            programs.append(compile(f.read(), name, "exec"))
    namespace = {"__name__": "__main__"}
    for program in programs:
        run(program, namespace)
    done()


_fds = int(sys.argv[1]), int(sys.argv[2])
sys.argv = ["solution.py"]
_run_to_completion(*_fds)
'''

# Runs first in the sandboxed interpreter: installs the full seccomp filter (no exec from
# here on; a filter cannot be removed), then runs the program. Where it cannot, nothing runs.
_SANDBOX_GUARD = r'''
import sys


def _lock():
    import ctypes

    with open("/verifier/seccomp.bpf", "rb") as f:
        rules = f.read()
    buffer = ctypes.create_string_buffer(rules, len(rules))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = Program(len(rules) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    if libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) != 0 or \
            libc.prctl(22, ulong(2), ctypes.byref(program), ulong(0), ulong(0)) != 0:  # NO_NEW_PRIVS, SECCOMP
        sys.stderr.write(f"sandbox: the seccomp filter could not be installed (errno {ctypes.get_errno()})\n")
        sys.stderr.flush()
        import os
        os._exit(97)


_lock()
del _lock
''' + _HARNESS

# A program for the probe: it passes only inside a working sandbox with the filter on.
_PROBE = ("import os, socket\nopen('written', 'w').write('x')\nassert not os.path.exists('/proc/self/mem')\n"
          "try:\n    socket.socket()\nexcept PermissionError:\n    print('sandbox ok')\n")


def _interpreter() -> str:
    """The base interpreter (a venv's ``python`` links to it): run with its standard library only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _outermost(paths: list[str]) -> list[str]:
    """The paths, without those inside another one, in order."""
    paths = sorted(set(paths))
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[str, ...]:
    """bwrap options for what the interpreter needs, read-only: the shared libraries
    (/usr/lib*, /lib* or their symlinks), the time zones, the interpreter and its standard
    library. Nothing of /etc, /home, /root, /tmp, the working tree or the venv."""
    args: list[str] = []
    for top in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    binds = [p for p in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/share/zoneinfo") if os.path.isdir(p)]
    interpreter = _interpreter()
    binds.append(interpreter)
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        if prefix in ("/", "/usr"):  # a system Python: its standard library is under /usr/lib
            binds.append(os.path.realpath(os.path.dirname(os.__file__)))
        else:
            binds.append(prefix)
    for path in _outermost(binds):
        args += ["--ro-bind", path, path]
    return tuple(args)


@dataclass(frozen=True)
class _Bubblewrap:
    path: str | None
    options: tuple[str, ...] = ()  # the namespaces (and user) that work here
    sized: bool = False  # bwrap takes --size (0.8+): the work folder's tmpfs is bounded
    problem: str = ""  # why there is no sandbox; "" when there is one


@functools.lru_cache(maxsize=8)
def _bubblewrap(bwrap: str | None) -> _Bubblewrap:
    """How ``bwrap`` makes a working sandbox here, tried once per path, or why it cannot."""
    import platform

    if bwrap is None:
        return _Bubblewrap(bwrap, problem="bubblewrap (`bwrap`) is not installed")
    try:
        seccomp_filter(platform.machine())
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired, SandboxUnavailable) as e:
        return _Bubblewrap(bwrap, problem=f"{bwrap} cannot be used: {e}")
    # A user namespace of its own, where "nobody" owns nothing; without one (a setuid bwrap on a
    # machine without unprivileged user namespaces) the other namespaces and the filter still hold.
    user = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    if "--disable-userns" in usage:
        user.append("--disable-userns")
    error = ""
    for options in (("--unshare-all", *user), ("--unshare-all",)):
        candidate = _Bubblewrap(bwrap, options, "--size" in usage)
        result = _sandboxed(candidate, _PROBE, "", 10.0, 256)
        if result.passed and result.stdout.strip() == "sandbox ok":
            return candidate
        error = error or (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return _Bubblewrap(bwrap, problem=f"{bwrap} cannot make the sandbox here: {error}")


def bubblewrap_problem() -> str | None:
    """None when the bubblewrap sandbox works here, else what is wrong (probed once per ``bwrap``)."""
    return _bubblewrap(shutil.which("bwrap")).problem or None


def _unavailable(problem: str) -> SandboxUnavailable:
    return SandboxUnavailable(
        f"sdg: the code verifier runs model-written code under bubblewrap, and {problem}. Install it "
        "(Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`) on a kernel that allows "
        "unprivileged user namespaces (`sysctl kernel.unprivileged_userns_clone=1`, `user.max_user_namespaces` > 0; "
        "on Ubuntu 24.04+ AppArmor's `kernel.apparmor_restrict_unprivileged_userns`; inside Docker the default "
        "seccomp profile forbids them). Or set `sdg.verify.sandbox: weak` to run the code without filesystem "
        "isolation or seccomp (it can then read and write every file this user can, and reach the network "
        "through ctypes where `unshare -rn` fails).")


def require_sandbox(sandbox: str) -> None:
    """Raise SandboxUnavailable, saying what to do, when ``sandbox`` cannot run code here."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox must be one of {SANDBOXES}, not {sandbox!r}")
    if sandbox == "bubblewrap" and (problem := bubblewrap_problem()):
        raise _unavailable(problem)


def _sandboxed(bwrap: _Bubblewrap, code: str, tests: str, timeout_s: float, memory_mb: int) -> CodeResult:
    import platform

    machine = platform.machine()
    contents = {"guard": _SANDBOX_GUARD.encode(), "filter": seccomp_filter(machine),
                "startup": seccomp_filter(machine, deny_exec=False), "code": code.encode(), "tests": tests.encode()}
    fds = {}
    try:
        for name, data in contents.items():
            fds[name] = os.memfd_create(f"sdg-sandbox-{name}")
            os.write(fds[name], data)
            os.lseek(fds[name], 0, os.SEEK_SET)
        env = {"PATH": "/usr/bin:/bin", "HOME": WORK_FOLDER, "TMPDIR": WORK_FOLDER, "LANG": "C.UTF-8"}
        command = [bwrap.path, *bwrap.options, "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                   "--hostname", "sandbox", "--clearenv"]
        for name, value in env.items():
            command += ["--setenv", name, value]
        command += list(_mounts())
        for device in ("null", "zero", "full", "random", "urandom"):
            command += ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]
        command += [*(["--size", str(WORK_FOLDER_BYTES)] if bwrap.sized else []), "--tmpfs", WORK_FOLDER,
                    "--file", str(fds["code"]), f"{WORK_FOLDER}/solution.py",
                    "--file", str(fds["tests"]), f"{WORK_FOLDER}/tests.py",
                    "--ro-bind-data", str(fds["guard"]), "/verifier/guard.py",
                    "--ro-bind-data", str(fds["filter"]), "/verifier/seccomp.bpf",
                    "--remount-ro", "/", "--chdir", WORK_FOLDER, "--seccomp", str(fds["startup"])]
        with _Completion() as completion:
            command += ["--", _interpreter(), "-I", "-B", "/verifier/guard.py", *completion.argv]
            return completion.judge(_run(command, None, {}, timeout_s, memory_mb,
                                         (*fds.values(), *completion.fds)))
    finally:
        for fd in fds.values():
            os.close(fd)


# ----- the weak sandbox: rlimits, an audit hook, and a network namespace where unshare works

# Runs first in the weakly sandboxed interpreter: installs the audit hook, then executes the
# program. Audit hooks cannot be removed once added (PEP 578).
_GUARD = r'''
import sys

_BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg"}
# ctypes could call libc's socket() past the hook: without a network namespace it is refused
# (and with it, packages that import ctypes, such as numpy).
_CTYPES = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"}
_ALLOW_CTYPES = sys.argv[3] == "allow-ctypes"


def _guard(event, args):
    if event in _BLOCKED or (not _ALLOW_CTYPES and event in _CTYPES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if not _ALLOW_CTYPES and event == "import" and args and args[0] in ("ctypes", "_ctypes"):
        raise PermissionError(f"sandbox: import {args[0]} is not allowed without a network namespace")


sys.addaudithook(_guard)
del _guard
''' + _HARNESS


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """``unshare -rn`` works here (user + network namespaces): then weakly sandboxed code runs with no network."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _weak(code: str, tests: str, timeout_s: float, memory_mb: int) -> CodeResult:
    use_namespace = network_namespace_available()
    with tempfile.TemporaryDirectory(prefix="sdg-sandbox-") as folder, _Completion() as completion:
        folder = Path(folder)
        (folder / "guard.py").write_text(_GUARD)
        (folder / "solution.py").write_text(code)
        (folder / "tests.py").write_text(tests)
        command = [sys.executable, "-I", "-B", str(folder / "guard.py"), *completion.argv,
                   "allow-ctypes" if use_namespace else "no-ctypes"]
        if use_namespace:
            command = ["unshare", "-rn", *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "LANG": "C.UTF-8"}
        return completion.judge(_run(command, folder, env, timeout_s, memory_mb, completion.fds))


# ----- both

NOT_COMPLETED = ("verifier: exit status 0, but the tests did not run to completion (the program ended before "
                 "them: os._exit, sys.exit or SystemExit), so they did not pass")


class _Completion:
    """The evidence that a run's tests completed (the module's docstring, *The verdict*): a
    random nonce on a pipe the guard reads and closes before the code runs, expected back,
    exactly, on a second pipe once the tests have returned. ``argv``: the two descriptors'
    numbers for the guard; ``fds``: the ends the sandboxed process inherits."""

    def __init__(self):
        self.nonce = secrets.token_hex(32).encode()
        self._nonce_read, nonce_write = os.pipe()
        try:
            os.write(nonce_write, self.nonce)  # 64 bytes: under PIPE_BUF, written at once
        finally:
            os.close(nonce_write)  # the guard's read ends at the nonce, never blocks
        self._done_read, self._done_write = os.pipe()
        self.fds = (self._nonce_read, self._done_write)
        self.argv = [str(fd) for fd in self.fds]

    def __enter__(self) -> _Completion:
        return self

    def __exit__(self, *exc) -> None:
        for fd in (self._nonce_read, self._done_read, self._done_write):
            os.close(fd)

    def judge(self, result: CodeResult) -> CodeResult:
        """``result`` (the process has ended), passed only where the nonce came back too."""
        os.set_blocking(self._done_read, False)  # a descendant could still hold the write end: never wait
        try:
            written = os.read(self._done_read, 4 * len(self.nonce))
        except BlockingIOError:
            written = b""
        if result.passed and not hmac.compare_digest(written, self.nonce):
            result.passed = False
            result.stderr = (result.stderr + ("\n" if result.stderr and not result.stderr.endswith("\n") else "")
                             + NOT_COMPLETED + "\n")
        return result


def _limits(cpu_s: int, memory_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))  # no file over 16 MiB
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # No RLIMIT_NPROC: it counts every process of the (real) user, so a tight one would fail
        # bwrap's own forks on a busy machine, and root ignores it; seccomp stops fork instead.

    return apply


def _run(command: list[str], cwd: Path | None, env: dict, timeout_s: float, memory_mb: int,
         pass_fds: tuple[int, ...]) -> CodeResult:
    """Run ``command`` with the limits; past ``timeout_s`` its whole process group is killed
    (under bwrap, with ``--die-with-parent``, that ends the sandbox's PID namespace too)."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, pass_fds=pass_fds,
                               preexec_fn=_limits(max(1, math.ceil(timeout_s)), memory_mb << 20))
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: nothing it started survives
        stdout, stderr = process.communicate()
        timed_out = True
    seconds = time.monotonic() - start
    # Out of CPU time: SIGXCPU, which bwrap reports as 128 + the signal.
    timed_out = timed_out or process.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
    return CodeResult(passed=process.returncode == 0 and not timed_out, returncode=process.returncode,
                      timed_out=timed_out, stdout=stdout[:OUTPUT_LIMIT].decode(errors="replace"),
                      stderr=stderr[-OUTPUT_LIMIT:].decode(errors="replace"), seconds=round(seconds, 3))


def run_code(code: str, tests: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
             sandbox: str = "bubblewrap") -> CodeResult:
    """Run ``code``, then ``tests`` (e.g. asserts), in one namespace in the sandbox. passed = exit
    status 0 in time *and* the run's nonce back from the guard, which writes it only once the
    tests have returned: code that exits early (``os._exit(0)``, ``sys.exit(0)``, ``raise
    SystemExit(0)``) fails, with ``NOT_COMPLETED`` as the last line of its stderr (the module's
    docstring, *The verdict*). Without tests, the code must run to its end.

    ``sandbox``: "bubblewrap" (the default; SandboxUnavailable where bwrap does not work here)
    or "weak" (see the module's docstring for what it gives up)."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox must be one of {SANDBOXES}, not {sandbox!r}")
    if sandbox == "weak":
        return _weak(code, tests, timeout_s, memory_mb)
    bwrap = _bubblewrap(shutil.which("bwrap"))  # probed once per path
    if bwrap.problem:
        raise _unavailable(bwrap.problem)
    return _sandboxed(bwrap, code, tests, timeout_s, memory_mb)


def verify_code(response: str, tests: str = "", **limits) -> CodeResult:
    """The response's code (fenced blocks, or the whole text) run with the problem's tests."""
    code = extract_code(response)
    if not code:
        return CodeResult(False, None, False, "", "no code in the response", 0.0)
    return run_code(code, tests, **limits)
