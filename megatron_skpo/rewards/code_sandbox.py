"""Run candidate Python programs against stdin/stdout test cases in a bubblewrap sandbox.

Reward = fraction of test cases whose stripped stdout equals the expected output.

Each run is one ``bwrap`` sandbox (command line and filesystem view: :mod:`.bwrap`):

- **containment**: fresh PID, user, mount, network, IPC and UTS namespaces. Our runner is the
  sandbox's PID 1 and starts the program as its child; when the program exits, or the wall-clock
  timeout kills PID 1, the kernel kills every process left in the namespace (a ``setsid`` child, a
  fork bomb) and they are reaped before :func:`run_program` returns, so nothing keeps running,
  writing or holding memory, and no zombie is left to count against the next run's process limit;
- **no filesystem access**: read-only ``/usr`` (and the interpreter), private size-limited tmpfs
  ``/tmp`` and ``/dev/shm`` that vanish with the sandbox, no project, home, ``/etc`` or host
  ``/proc`` (the sandbox's ``/proc`` lists only its own processes);
- **no network**: an empty network namespace (a loopback device only), plus an audit hook in the
  runner that refuses every ``socket.*`` event (a second layer);
- **resource limits** set by the runner before the program starts (``setrlimit``): address space,
  CPU seconds, file size, no core files, processes. The process limit counts only the sandbox's
  processes (it binds per user *namespace*, and each sandbox has its own), so other sandboxes or
  processes of the same user do not eat into it. Memory is bounded by ``nproc x memory_mb`` plus
  the two tmpfs sizes. Why rlimits and not a cgroup: cgroup files are writable only as root, on a
  delegated cgroup v2 subtree or a writable v1 mount, which varies by machine and container; the
  PID namespace plus rlimits work wherever bwrap itself runs;
- **privileges**: as root, bwrap is started as user ``nobody`` (bwrap run by root would keep all
  capabilities inside, and RLIMIT_NPROC never binds host uid 0);
- a wall-clock timeout (SIGKILL to the sandbox's PID 1), a minimal environment, ``python -I -S``.

Without a working ``bwrap`` every run raises :class:`SandboxUnavailable` with what to install or
change; nothing ever runs unsandboxed.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from megatron_skpo.rewards.bwrap import (
    NOBODY, SandboxUnavailable, bwrap_command, bwrap_path, check_version, drops_to_nobody, sandbox_interpreter,
    spawn_user)

__all__ = ["NOBODY", "RunResult", "SandboxLimits", "SandboxUnavailable", "TestCase", "check_sandbox", "code_reward",
           "network_isolation", "run_program", "run_tests", "sandbox_python"]

# PID 1 of the sandbox: limits, then the program in a child; it reaps every orphan re-parented to
# it and exits with the program's status, which makes the kernel kill whatever is left.
_RUNNER = """import os, resource, sys
for _res, _value in zip((resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_CORE,
                         resource.RLIMIT_NPROC), map(int, sys.argv[1:6])):
    resource.setrlimit(_res, (_value, _value))
_main = os.fork()
if _main:
    while True:
        _pid, _status = os.wait()
        if _pid == _main:
            _code = os.waitstatus_to_exitcode(_status)
            os._exit(_code if _code >= 0 else 128 - _code)
def _no_net(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_no_net)
sys.argv = ["main.py"]
import runpy
runpy.run_path("/sandbox/main.py", run_name="__main__")
"""
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits."""

    wall_s: float = 10.0  # wall-clock timeout; the whole sandbox is killed after it
    cpu_s: int = 5  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 512  # RLIMIT_AS, per process
    nproc: int = 32  # RLIMIT_NPROC: processes (and threads) in the sandbox, its PID 1 included
    fsize_mb: int = 16  # RLIMIT_FSIZE (also caps stdout/stderr, which go to files)
    tmpfs_mb: int = 64  # size of each private tmpfs (/tmp, the working directory, and /dev/shm)


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest class

    stdin: str
    expected: str


@dataclass(frozen=True)
class RunResult:
    returncode: Optional[int]  # None when killed by the wall-clock timeout; 128+N for death by signal N
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def sandbox_python() -> str:
    """Path of the interpreter candidate programs run with (see :func:`.bwrap.sandbox_interpreter`)."""
    return sandbox_interpreter().path


@lru_cache(maxsize=1)
def check_sandbox() -> str:
    """Start one trivial sandbox; :class:`SandboxUnavailable` naming the cause if it cannot start.

    Returns bwrap's path. Cached after the first success; a failure is checked again next call.
    """
    bwrap = bwrap_path()
    check_version(bwrap)
    result = _run("print('sandbox ok')", "", SandboxLimits(wall_s=60.0))
    if result.returncode == 0 and result.stdout.strip() == "sandbox ok":
        return bwrap
    who = "as user 'nobody' " if drops_to_nobody() else ""
    raise SandboxUnavailable(
        f"code sandbox: {bwrap} failed to start a sandbox {who}(exit code {result.returncode}): "
        f"{result.stderr.strip()[-500:] or 'no message'}. bwrap needs unprivileged user namespaces: check "
        "`sysctl user.max_user_namespaces` (> 0), `sysctl kernel.unprivileged_userns_clone` (= 1 on Debian "
        "kernels that have it), on Ubuntu 24.04+ `sysctl kernel.apparmor_restrict_unprivileged_userns` (= 0, or "
        "an AppArmor profile for bwrap); in a container, allow unshare/mount (e.g. Docker's --security-opt "
        "seccomp=unconfined --security-opt apparmor=unconfined)")


def network_isolation() -> str:
    """``"netns"``: every run has an empty network namespace of its own (only a loopback device).

    Kept for callers of the earlier API, which could fall back to ``"audit_hook"``; there is no
    fallback now: :class:`SandboxUnavailable` if the sandbox cannot run here.
    """
    check_sandbox()
    return "netns"


def _read_init_pid(fd: int, timeout: float) -> Optional[int]:
    """Host pid of the sandbox's PID 1 from bwrap's ``--info-fd`` JSON; None if bwrap wrote none."""
    buf, deadline = b"", time.monotonic() + timeout
    poller = select.poll()  # not select.select: it fails on descriptors >= 1024 (a busy trainer has them)
    poller.register(fd, select.POLLIN)
    while time.monotonic() < deadline:
        ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            return None
        buf += chunk
        try:
            return int(json.loads(buf)["child-pid"])
        except (ValueError, KeyError):  # not complete yet
            continue
    return None


class _SandboxInit:
    """A pidfd on the sandbox's PID 1: killing it kills the whole PID namespace, and bwrap (its
    parent, which we wait for) reaps it, so no zombie is left even where host PID 1 never reaps."""

    def __init__(self, pid: Optional[int], bwrap: subprocess.Popen):
        self.bwrap, self.pidfd = bwrap, None
        if pid is None:
            return
        try:
            self.pidfd = os.pidfd_open(pid)
            # A pid is only ours while bwrap has not reaped it; a recycled pid has another parent.
            status = Path(f"/proc/{pid}/status").read_text()
            if int(status.split("PPid:")[1].split()[0]) != bwrap.pid:
                self.close()
        except (OSError, IndexError, ValueError):
            self.close()

    def kill(self) -> None:
        if self.bwrap.poll() is not None:
            return
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                return
            except ProcessLookupError:
                return
        self.bwrap.kill()  # no pid from bwrap: --die-with-parent takes the sandbox down with it

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _run(source: str, stdin: str, limits: SandboxLimits) -> RunResult:
    """One sandboxed run (no availability check)."""
    interp = sandbox_interpreter()
    mb = 2**20
    rlimits = (limits.memory_mb * mb, limits.cpu_s, limits.fsize_mb * mb, 0, limits.nproc)
    with tempfile.TemporaryDirectory(prefix="skpo-sandbox-") as tmp:  # host side only, never bound
        work = Path(tmp)
        # surrogatepass: text that is not valid Unicode reaches the program as bytes it fails on
        (work / "main.py").write_text(source, encoding="utf-8", errors="surrogatepass")
        (work / "runner.py").write_text(_RUNNER)
        (work / "stdin").write_text(stdin, encoding="utf-8", errors="surrogatepass")
        info_r, info_w = os.pipe()
        t0, timed_out = time.monotonic(), False
        try:
            with open(work / "main.py", "rb") as fmain, open(work / "runner.py", "rb") as frunner, \
                    open(work / "stdin", "rb") as fin, open(work / "stdout", "wb") as fout, \
                    open(work / "stderr", "wb") as ferr:
                fds = (fmain.fileno(), frunner.fileno(), info_w)
                argv = bwrap_command(interp, fmain.fileno(), frunner.fileno(), info_w, limits.tmpfs_mb,
                                     tuple(str(v) for v in rlimits))
                proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=_ENV, close_fds=True,
                                        pass_fds=fds, start_new_session=True, cwd="/", **spawn_user())
                os.close(info_w)
                info_w = -1
                init = _SandboxInit(_read_init_pid(info_r, limits.wall_s), proc)
                try:
                    proc.wait(timeout=max(0.0, limits.wall_s - (time.monotonic() - t0)))
                except subprocess.TimeoutExpired:
                    timed_out = True
                init.kill()  # also ends a namespace whose program exited a moment ago
                proc.wait()
                init.close()
        finally:
            os.close(info_r)
            if info_w >= 0:
                os.close(info_w)
        read = lambda name: (work / name).read_bytes()[: 1 << 20].decode("utf-8", "replace")  # noqa: E731
        return RunResult(None if timed_out else proc.returncode, read("stdout"), read("stderr"),
                         timed_out, time.monotonic() - t0)


def run_program(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run Python ``source`` once in the sandbox with ``stdin``.

    Never raises on program behaviour; raises :class:`SandboxUnavailable` when no sandbox can run
    here (bwrap missing or unable to create namespaces), rather than run the program unsandboxed.
    """
    check_sandbox()
    return _run(source, stdin, limits)


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
