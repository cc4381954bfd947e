"""The code sandbox: correct programs pass; loops, fork bombs, huge allocations and sockets do not escape."""
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_skpo.rewards import code_sandbox as cs
from megatron_skpo.rewards.code_sandbox import SandboxLimits, TestCase, code_reward, run_program, run_tests

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, nproc=16)
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_reward_is_fraction_of_tests_passed():
    tests = [TestCase("1 2", "3"), TestCase("5 5", "10"), TestCase("2 2", "5")]
    assert code_reward(ADD, tests, LIMITS) == pytest.approx(2 / 3)
    assert code_reward("print(3)", tests[:1], LIMITS) == 1.0
    assert code_reward("raise SystemExit(1)", tests[:1], LIMITS) == 0.0  # non-zero exit fails the test
    with pytest.raises(ValueError, match="no test cases"):
        run_tests(ADD, [], LIMITS)


def test_infinite_loop_is_killed():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", "", LIMITS)
    assert r.returncode != 0 and time.monotonic() - t0 < LIMITS.wall_s + 2
    r = run_program("import time\ntime.sleep(60)\n", "", LIMITS)  # sleeps burn no CPU: the wall clock kills it
    assert r.timed_out and r.returncode is None and r.seconds < LIMITS.wall_s + 2


def test_fork_bomb_hits_the_process_limit():
    src = ("import os\nn = 0\nfor _ in range(1000):\n    try:\n        pid = os.fork()\n    except OSError:\n"
           "        break\n    if pid == 0:\n        import time; time.sleep(30); os._exit(0)\n    n += 1\nprint(n)\n")
    r = run_program(src, "", LIMITS)
    assert r.returncode == 0 and int(r.stdout) < LIMITS.nproc


def test_10gb_allocation_fails():
    r = run_program("x = bytearray(10 * 2**30)\nprint('allocated')\n", "", LIMITS)
    assert r.returncode != 0 and "allocated" not in r.stdout and "MemoryError" in r.stderr


@pytest.fixture()
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield srv.getsockname()[1]
    srv.close()


def _connect(port: int) -> str:
    return f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"


def test_socket_fails(listener):
    r = run_program(_connect(listener), "", LIMITS)
    assert r.returncode != 0 and "connected" not in r.stdout


def test_network_namespace_alone_blocks_sockets(listener, monkeypatch):
    """The kernel layer on its own (audit hook removed): the connection to a live port fails."""
    monkeypatch.setattr(cs, "_RUNNER", cs._RUNNER.replace("sys.addaudithook(_no_net)", ""))
    r = run_program(_connect(listener), "", LIMITS)
    # The sandbox's own loopback is up but nothing listens on it: the host's port is not there.
    assert r.returncode != 0 and "connected" not in r.stdout
    assert "connectionrefused" in r.stderr.lower() or "unreachable" in r.stderr.lower()
    # Control: the same program outside the sandbox connects (the port really is open).
    s = socket.create_connection(("127.0.0.1", listener), timeout=2)
    s.close()


def test_fresh_working_directory_and_file_size_limit():
    src = "import os\nprint(sorted(os.listdir('.')))\nopen('out.txt', 'w').write('x')\n"
    a, b = run_program(src, "", LIMITS), run_program(src, "", LIMITS)
    assert a.stdout == b.stdout  # the file written by the first run is not there in the second
    assert "out.txt" not in a.stdout
    big = run_program("open('f', 'w').write('x' * (64 * 2**20))\nprint('done')\n", "", LIMITS)
    assert big.returncode != 0 and "done" not in big.stdout


# ----- containment probes: nothing the program starts or writes outlives its run -------------------
def _processes_in(pidns: str, pid: int | None = None) -> list[int]:
    """Host pids of the processes in PID namespace ``pidns`` (``pid:[inode]``), or of the one whose
    pid inside it is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != pidns:
                continue
            nspid = next(line for line in open(f"/proc/{entry}/status") if line.startswith("NSpid:"))
        except (OSError, StopIteration):  # exited while we looked
            continue
        if pid is None or int(nspid.split()[-1]) == pid:
            found.append(int(entry))
    return found


SETSID_CHILD = """import os, time
if os.fork() == 0:
    os.setsid()  # leaves the process group a group kill would reach
    hog = bytearray(64 * 2**20)
    print(os.readlink('/proc/self/ns/pid'), os.getpid(), flush=True)
    time.sleep(30)
    os._exit(0)
time.sleep(1)
"""


def test_setsid_child_does_not_survive_the_run():
    r = run_program(SETSID_CHILD, "", LIMITS)
    pidns, pid = r.stdout.split()
    assert _processes_in(pidns, int(pid)) == []  # gone when run_program returns, with its memory


def test_fork_bomb_is_contained_and_cleaned_up():
    src = ("import os\nprint(os.readlink('/proc/self/ns/pid'), flush=True)\nwhile True:\n    try:\n"
           "        os.fork()\n    except OSError:\n        pass\n")
    t0 = time.monotonic()
    r = run_program(src, "", LIMITS)
    assert r.timed_out and time.monotonic() - t0 < LIMITS.wall_s + 3
    pidns = r.stdout.split()[0]
    assert pidns != os.readlink("/proc/self/ns/pid")  # the program ran in a PID namespace of its own
    assert _processes_in(pidns) == []  # and everything in it was killed and reaped


FORK_THEN_EXIT_BOMB = """import os
while True:
    try:
        if os.fork() == 0:
            os._exit(0)  # a zombie until someone reaps it
    except OSError:
        pass
"""
FORKS_OK = """import os
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print('forked')
"""


@pytest.mark.slow
def test_fork_bomb_leaves_nothing_that_breaks_the_next_run():
    """Zombies of a fork bomb must not count against the next program's process limit."""
    r = run_program(FORK_THEN_EXIT_BOMB, "", LIMITS)
    assert r.timed_out or r.returncode == 128 + 9  # the wall clock or the CPU limit (SIGKILL) ended it
    for _ in range(2):
        nxt = run_program(FORKS_OK.format(n=LIMITS.nproc), "", LIMITS)
        assert nxt.returncode == 0 and nxt.stdout.strip() == "forked", nxt.stderr[-500:]
        assert run_program(ADD, "2 3", LIMITS).stdout.strip() == "5"


def test_project_source_and_home_are_not_visible():
    here = Path(cs.__file__).resolve()
    src = (f"import os\nfor p in [{str(here)!r}, {str(here.parents[2])!r}, '/root', '/work', '/home', '/etc/passwd']:\n"
           "    print(p, os.path.exists(p))\n")
    r = run_program(src, "", LIMITS)
    assert r.returncode == 0, r.stderr
    seen = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines())
    assert seen == {k: "False" for k in seen} and len(seen) == 6


def test_other_processes_are_not_visible_in_proc():
    marker = f"skpo-probe-{uuid.uuid4().hex}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        src = (f"import os\nfound, n = [], 0\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n        n += 1\n"
               f"        try:\n            found += [p] if {marker!r} in open(f'/proc/{{p}}/cmdline').read() else []\n"
               "        except OSError:\n            pass\nprint(n, found)\n")
        r = run_program(src, "", LIMITS)
    finally:
        other.kill()
        other.wait()
    assert r.returncode == 0, r.stderr
    n, found = r.stdout.split(" ", 1)
    assert found.strip() == "[]" and int(n) <= 3  # only the sandbox's own init and program


def test_tmp_and_dev_shm_writes_do_not_persist():
    token = f"skpo-probe-{uuid.uuid4().hex}"
    paths = [Path("/tmp") / token, Path("/dev/shm") / token]
    write = "".join(f"open({str(p)!r}, 'w').write('x')\n" for p in paths) + "print('written')\n"
    look = "import os\n" + "".join(f"print(os.path.exists({str(p)!r}))\n" for p in paths)
    try:
        first = run_program(write, "", LIMITS)
        assert first.stdout.strip() == "written", first.stderr  # private /tmp and /dev/shm are writable
        assert [p.exists() for p in paths] == [False, False]  # ... but nothing reached the host
        assert run_program(look, "", LIMITS).stdout.split() == ["False", "False"]  # nor the next run
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


PRIVATE_FS = """import os
for p in ['/x', '/usr/x', '/dev/x']:
    try:
        open(p, 'w').close()
        os.remove(p)
        print(p, 'writable')
    except OSError:
        pass
for d in ['/tmp', '/dev/shm']:
    names = [f'{d}/skpo-fill-{i}' for i in range({cap})]
    try:
        for name in names:
            with open(name, 'wb') as f:
                f.write(b'x' * 2**20)
        print(d, 'unbounded')
    except OSError:
        print(d, 'full at', names.index(name), 'MB')
    for name in names:  # this probe must not leave files behind on a machine where it fails
        if os.path.exists(name):
            os.remove(name)
"""


def test_private_filesystems_are_small_and_the_rest_read_only():
    r = run_program(PRIVATE_FS.replace("{cap}", str(2 * LIMITS.tmpfs_mb)), "", LIMITS)
    assert "writable" not in r.stdout and "unbounded" not in r.stdout, r.stdout
    full = [int(line.split()[-2]) for line in r.stdout.splitlines() if "full at" in line]
    assert len(full) == 2 and all(n <= LIMITS.tmpfs_mb for n in full), r.stdout + r.stderr


def _host_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # UDP connect sends nothing: it only picks the outgoing address
        return s.getsockname()[0]


def test_no_network_interfaces_or_routes(monkeypatch):
    """Kernel layer alone (audit hook removed): only a loopback device, and the host's own address
    with a live listener on it is unreachable."""
    monkeypatch.setattr(cs, "_RUNNER", cs._RUNNER.replace("sys.addaudithook(_no_net)", ""))
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen()
    host, port = _host_address(), srv.getsockname()[1]
    try:
        src = ("import socket\nprint([l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])\n"
               f"socket.create_connection(({host!r}, {port}), timeout=2)\nprint('connected')\n")
        r = run_program(src, "", LIMITS)
        assert r.stdout.splitlines()[0] == "['lo']" and "connected" not in r.stdout
        assert "unreachable" in r.stderr.lower()
        socket.create_connection((host, port), timeout=2).close()  # control: reachable from outside
    finally:
        srv.close()


def test_missing_bubblewrap_is_a_clear_error(monkeypatch):
    """Never run unsandboxed: without bwrap every run fails and says how to install it."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    with pytest.raises(cs.SandboxUnavailable, match="apt-get install bubblewrap"):
        run_program("print(1)", "", LIMITS)
    with pytest.raises(cs.SandboxUnavailable):
        code_reward("print(1)", [TestCase("", "1")], LIMITS)


def test_sandbox_binds_nothing_of_the_project_or_home():
    from megatron_skpo.rewards.bwrap import bwrap_command, sandbox_interpreter

    argv = bwrap_command(sandbox_interpreter(), 3, 4, 5, 64, ())
    sources = [Path(argv[i + 1]) for i, a in enumerate(argv) if a in ("--bind", "--ro-bind", "--dev-bind")]
    project, home = Path(cs.__file__).resolve().parents[2], Path.home().resolve()
    assert sources and Path("/usr") in sources
    for src in sources:
        assert not (src == project or project in src.parents or src in project.parents), src
        assert src != home and src not in home.parents, src


def test_interpreter_outside_usr_is_bound_read_only_without_site_packages(tmp_path, monkeypatch):
    from megatron_skpo.rewards import bwrap

    monkeypatch.setattr(bwrap, "drops_to_nobody", lambda: False)
    prefix = tmp_path / "python"
    exe = prefix / "bin" / "python3.11"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    exe.chmod(0o755)
    site = prefix / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    interp = bwrap._interpreter_from(exe, prefix)
    assert interp.path == str(exe)
    assert interp.binds == ("--ro-bind", str(prefix), str(prefix), "--tmpfs", str(site), "--remount-ro", str(site))
    assert bwrap._interpreter_from(exe, Path("/")) is None
    monkeypatch.setattr(bwrap, "PROJECT_ROOT", prefix / "src" / "checkout")
    assert bwrap._interpreter_from(exe, prefix) is None  # a prefix holding the checkout is never bound


def test_too_old_bubblewrap_is_a_clear_error(tmp_path):
    from megatron_skpo.rewards.bwrap import check_version

    old = tmp_path / "bwrap"
    old.write_text("#!/bin/sh\necho bubblewrap 0.6.1\n")
    old.chmod(0o755)
    with pytest.raises(cs.SandboxUnavailable, match=r"reports 'bubblewrap 0\.6\.1'; the sandbox needs bubblewrap 0\.8"):
        check_version(str(old))
    assert check_version(shutil.which("bwrap")) >= (0, 8, 0)
