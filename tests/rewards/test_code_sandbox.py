"""The code sandbox: correct programs pass; loops, fork bombs, huge allocations and sockets do not escape."""
import os
import socket
import time

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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_fork_bomb_is_contained_and_cleaned_up():
    src = "import os\nprint(os.getpgrp(), flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    r = run_program(src, "", LIMITS)
    assert r.timed_out and time.monotonic() - t0 < LIMITS.wall_s + 3
    pgid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid)  # the whole process group was killed


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
    if cs.network_isolation() != "netns":
        pytest.skip("no network namespaces on this machine: only the audit-hook fallback applies")
    monkeypatch.setattr(cs, "_RUNNER", cs._RUNNER.replace("sys.addaudithook(_no_net)", ""))
    r = run_program(_connect(listener), "", LIMITS)
    assert r.returncode != 0 and "unreachable" in r.stderr.lower()
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
