"""Run candidate Python programs against stdin/stdout test cases in a sandboxed subprocess.

Reward = fraction of test cases whose stripped stdout equals the expected output.

Isolation of each run (set up in the child between fork and exec, ``preexec_fn``):
- **no network**: a new, empty network namespace (``unshare(CLONE_NEWNET)``, kernel-level; not
  even loopback is up). As root this needs nothing else; as an ordinary user we add a user
  namespace (``CLONE_NEWUSER | CLONE_NEWNET``). Where the kernel forbids both, the run falls back
  to the second layer alone and :func:`network_isolation` reports ``"audit_hook"``;
- a second layer in every run: a ``sys.addaudithook`` in the runner that refuses every
  ``socket.*`` event (pure Python; defeated by ctypes tricks, hence only a fallback);
- **resource limits** (``setrlimit``): address space, CPU seconds, processes, file size, no core
  files; as root the child also drops to uid/gid ``nobody``, because RLIMIT_NPROC does not bind root;
- a fresh temporary working directory, removed afterwards; a minimal environment; ``python -I``;
- a wall-clock timeout that SIGKILLs the whole process group (``setsid`` makes the child a leader).
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
NOBODY = 65534

_RUNNER = """import sys
def _no_net(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_no_net)
sys.argv = ["main.py"]
import runpy
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits."""

    wall_s: float = 10.0  # wall-clock timeout; the process group is killed after it
    cpu_s: int = 5  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 512  # RLIMIT_AS
    nproc: int = 32  # RLIMIT_NPROC (processes of the sandbox user)
    fsize_mb: int = 16  # RLIMIT_FSIZE (also caps stdout/stderr, which go to files)


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest class

    stdin: str
    expected: str


@dataclass(frozen=True)
class RunResult:
    returncode: Optional[int]  # None when killed by the wall-clock timeout
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _libc_unshare(flags: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(flags) == 0


@lru_cache(maxsize=1)
def network_isolation() -> str:
    """``"netns"`` if a child here can enter an empty network namespace, else ``"audit_hook"``."""
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    probe = subprocess.run(
        [sys.executable, "-I", "-c", f"import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"],
        capture_output=True, timeout=30)
    return "netns" if probe.returncode == 0 else "audit_hook"


def _world_executable(path: str) -> bool:
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


@lru_cache(maxsize=1)
def sandbox_python() -> str:
    """Interpreter for candidates: when we drop to ``nobody`` it must be reachable by that user."""
    if os.geteuid() != 0:
        return sys.executable
    for cand in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(cand) and _world_executable(cand):
            return cand
    raise RuntimeError("code sandbox: no Python interpreter executable by user 'nobody' "
                       f"(tried {sys.executable}, /usr/bin/python3)")


def _preexec(limits: SandboxLimits, netns: bool) -> None:
    """Runs in the child after fork, before exec: namespace, limits, then privileges."""
    os.setsid()
    if netns:
        _libc_unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET)
    mb = 2**20
    for res, value in ((resource.RLIMIT_AS, limits.memory_mb * mb), (resource.RLIMIT_CPU, limits.cpu_s),
                       (resource.RLIMIT_FSIZE, limits.fsize_mb * mb), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NPROC, limits.nproc)):
        resource.setrlimit(res, (value, value))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def run_program(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run Python ``source`` once in the sandbox with ``stdin``; never raises on program behaviour."""
    netns = network_isolation() == "netns"
    with tempfile.TemporaryDirectory(prefix="skpo-sandbox-") as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(source)
        (work / "runner.py").write_text(_RUNNER)
        (work / "stdin").write_text(stdin)
        if os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)
        t0, timed_out = time.monotonic(), False
        with open(work / "stdin", "rb") as fin, open(work / "stdout", "wb") as fout, \
                open(work / "stderr", "wb") as ferr:
            proc = subprocess.Popen(
                [sandbox_python(), "-I", "-S", "runner.py"], cwd=work, stdin=fin, stdout=fout, stderr=ferr,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, close_fds=True,
                preexec_fn=lambda: _preexec(limits, netns))
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also reaps children left behind by a program that exited
            proc.wait()
        read = lambda name: (work / name).read_bytes()[: 1 << 20].decode("utf-8", "replace")  # noqa: E731
        return RunResult(None if timed_out else proc.returncode, read("stdout"), read("stderr"),
                         timed_out, time.monotonic() - t0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _same_output(actual: str, expected: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(actual) == norm(expected)


def run_tests(source: str, tests: Sequence[TestCase],
              limits: SandboxLimits = SandboxLimits()) -> tuple[float, list[RunResult]]:
    """Fraction of ``tests`` passed (the code reward) and the per-test results."""
    if not tests:
        raise ValueError("run_tests: no test cases")
    results = [run_program(source, t.stdin, limits) for t in tests]
    passed = sum(r.returncode == 0 and _same_output(r.stdout, t.expected) for r, t in zip(results, tests))
    return passed / len(tests), results


def code_reward(source: str, tests: Sequence[TestCase], limits: SandboxLimits = SandboxLimits()) -> float:
    """Fraction of test cases passed by ``source`` (0.0 .. 1.0)."""
    return run_tests(source, tests, limits)[0]
