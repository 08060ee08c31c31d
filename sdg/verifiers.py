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
- **Code**: run in a fresh ``python -I`` subprocess with limits on CPU time, wall time
  (the whole process group is killed), address space, file size and open files, a
  scrubbed environment, an empty working folder, and no network: an audit hook
  (PEP 578) refuses sockets, subprocesses and ``os.system``/``exec``/``fork``/``kill``; where
  ``unshare -rn`` works the process also runs in a network namespace of its own with no
  interface up (without one, ``ctypes`` is refused too, and with it packages such as numpy). This stops mistakes and runaway code from a model; it is not a
  boundary against code written to escape (run untrusted code at scale in a container).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
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

# Runs first in the sandboxed interpreter: installs the audit hook, then executes the
# program. Audit hooks cannot be removed once added (PEP 578).
_GUARD = r'''
import sys

_BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg"}
# ctypes could call libc's socket() past the hook: without a network namespace it is refused
# (and with it, packages that import ctypes, such as numpy).
_CTYPES = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"}
_ALLOW_CTYPES = sys.argv[2] == "allow-ctypes"


def _guard(event, args):
    if event in _BLOCKED or (not _ALLOW_CTYPES and event in _CTYPES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if not _ALLOW_CTYPES and event == "import" and args and args[0] in ("ctypes", "_ctypes"):
        raise PermissionError(f"sandbox: import {args[0]} is not allowed without a network namespace")


sys.addaudithook(_guard)
del _guard
_path = sys.argv[1]
sys.argv = sys.argv[1:2]
with open(_path) as _f:
    _source = _f.read()
exec(compile(_source, "solution.py", "exec"), {"__name__": "__main__"})
'''

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept


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


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """``unshare -rn`` works here (user + network namespaces): then code runs with no network at all."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(cpu_s: int, memory_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))  # no file over 16 MiB
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_code(code: str, tests: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
             network_namespace: str = "auto") -> CodeResult:
    """Run ``code`` (then ``tests``, e.g. asserts) in the sandbox; passed = exit status 0 in time.

    ``network_namespace``: "auto" uses ``unshare -rn`` when it works, "on" requires it,
    "off" relies on the audit hook alone."""
    use_namespace = network_namespace == "on" or (network_namespace == "auto" and network_namespace_available())
    if network_namespace == "on" and not network_namespace_available():
        raise RuntimeError("verify.network_namespace is 'on' but `unshare -rn` does not work on this machine")
    with tempfile.TemporaryDirectory(prefix="sdg-sandbox-") as folder:
        folder = Path(folder)
        (folder / "guard.py").write_text(_GUARD)
        (folder / "solution.py").write_text(code + ("\n\n" + tests if tests else "") + "\n")
        command = [sys.executable, "-I", "-B", str(folder / "guard.py"), str(folder / "solution.py"),
                   "allow-ctypes" if use_namespace else "no-ctypes"]
        if use_namespace:
            command = ["unshare", "-rn", *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True,
                                   preexec_fn=_limits(max(1, math.ceil(timeout_s)), memory_mb << 20))
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: nothing it started survives
            stdout, stderr = process.communicate()
            timed_out = True
        seconds = time.monotonic() - start
    timed_out = timed_out or process.returncode == -signal.SIGXCPU
    return CodeResult(passed=process.returncode == 0 and not timed_out, returncode=process.returncode,
                      timed_out=timed_out, stdout=stdout[:OUTPUT_LIMIT].decode(errors="replace"),
                      stderr=stderr[-OUTPUT_LIMIT:].decode(errors="replace"), seconds=round(seconds, 3))


def verify_code(response: str, tests: str = "", **limits) -> CodeResult:
    """The response's code (fenced blocks, or the whole text) run with the problem's tests."""
    code = extract_code(response)
    if not code:
        return CodeResult(False, None, False, "", "no code in the response", 0.0)
    return run_code(code, tests, **limits)
