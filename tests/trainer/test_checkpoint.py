"""Atomic checkpoints: kill -9 during save, keep-last-K, fallback to the previous complete one, RNG round trip."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_state import fresh, make_state, parts_of, snapshot  # noqa: E402

from megatron_skpo.trainer.checkpoint import (  # noqa: E402
    LATEST, MARKER, CheckpointError, CheckpointManager, is_complete)
from megatron_skpo.trainer.parts import RNGPart, TrainProgress, JsonPart, get_rng_state, set_rng_state  # noqa: E402

CHILD = Path(__file__).with_name("ckpt_child.py")


def _save_steps(mgr: CheckpointManager, steps) -> None:
    for s in steps:
        mgr.save(s, parts_of(make_state(s)))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_restore_identical_state(tmp_path):
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=3)
    _save_steps(mgr, [7])
    want = snapshot(make_state(7))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # clobber the global streams
    objs = fresh()
    ck = mgr.restore(parts_of(objs))
    assert ck.step == 7 and snapshot(objs) == want
    assert (tmp_path / LATEST).read_text() == "step_00000007\n"
    assert json.loads((tmp_path / "step_00000007" / MARKER).read_text())["step"] == 7


def test_keep_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=2)
    _save_steps(mgr, [1, 2, 3, 4])
    assert _names(tmp_path) == [LATEST, "step_00000003", "step_00000004"]
    assert [c.step for c in mgr.complete()] == [3, 4]


@pytest.mark.parametrize("interval,steps,want", [
    (3, 10, [3, 6, 9, 10]),  # every 3rd step and always the last
    (0, 5, [5]),             # 0 = only at the end
])
def test_should_save(interval, steps, want):
    mgr = CheckpointManager("unused", save_interval=interval, keep_last=1)
    assert [s for s in range(1, steps + 1) if mgr.should_save(s, steps)] == want


def test_partial_latest_falls_back_with_warning(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=3)
    _save_steps(mgr, [1, 2])
    (tmp_path / "step_00000002" / MARKER).unlink()  # damaged after the fact
    assert mgr.latest().step == 1
    assert "not a complete checkpoint" in caplog.text
    objs = fresh()
    assert mgr.restore(parts_of(objs)).step == 1 and snapshot(objs) == snapshot(make_state(1))
    _save_steps(mgr, [2])  # a resumed run saves step 2 again over the partial directory
    assert is_complete(tmp_path / "step_00000002") and mgr.latest().step == 2


def test_missing_pointer_and_missing_part(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=3)
    assert mgr.latest() is None and mgr.restore(parts_of(fresh())) is None
    mgr.save(1, {"progress": JsonPart(TrainProgress(step=1))})
    (tmp_path / LATEST).unlink()
    assert mgr.latest().step == 1 and "no latest pointer" in caplog.text
    with pytest.raises(CheckpointError, match="has no part.*sampler"):
        mgr.restore(parts_of(fresh()))


def test_rng_round_trip_reproduces_streams(tmp_path):
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    np.random.randn()  # leaves a cached Gaussian: has_gauss must round-trip too
    RNGPart(rank=3).save(tmp_path)

    def draw():
        return (random.random(), random.getrandbits(64), np.random.randn(3).tolist(),
                np.random.randint(0, 1 << 30), torch.rand(4).tolist(), torch.randint(0, 100, (3,)).tolist())

    first = draw()
    RNGPart(rank=3).load(tmp_path)
    assert draw() == first
    with pytest.raises(FileNotFoundError, match="rank_00001.pt.*rank_00003.pt"):
        RNGPart(rank=1).load(tmp_path)
    state = torch.load(tmp_path / "rank_00003.pt", weights_only=True)  # the file loads without pickle
    set_rng_state(state)
    assert draw() == first


def test_two_ranks_each_save_their_rng(tmp_path):
    """Rank 0 writes shared parts and commits; every rank writes its collective part (threads as ranks)."""
    barrier = threading.Barrier(2)
    errors = []

    def rank(r: int) -> None:
        try:
            mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=1, rank=r, barrier=barrier.wait)
            mgr.save(4, {"progress": JsonPart(TrainProgress(step=4)), "rng": RNGPart(r)})
        except Exception as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert not errors
    assert _names(tmp_path / "step_00000004" / "rng") == ["rank_00000.pt", "rank_00001.pt"]


@pytest.mark.slow
def test_kill_during_save_always_leaves_complete_latest(tmp_path):
    """kill -9 a saving child at seeded random moments; ``latest`` stays complete and restores exactly."""
    rng = random.Random(1234)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    seen_steps, interrupted = [], 0
    deadline = time.monotonic() + 240
    for _ in range(6):
        assert time.monotonic() < deadline, "kill test ran out of time"
        child = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path)], stdout=subprocess.PIPE,
                                 text=True, env=env)
        try:
            assert child.stdout.readline().strip() == "ready", "child failed to restore an identical state"
            time.sleep(rng.uniform(0.05, 0.8))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        interrupted += any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
        mgr = CheckpointManager(tmp_path, save_interval=1, keep_last=2)
        name = (tmp_path / LATEST).read_text().strip()
        assert is_complete(tmp_path / name), f"latest -> {name} is not complete"
        objs = fresh()
        ck = mgr.restore(parts_of(objs))
        assert ck.path.name == name and snapshot(objs) == snapshot(make_state(ck.step))
        assert len(mgr.complete()) <= 3  # keep_last + one not yet pruned when killed right after commit
        seen_steps.append(ck.step)
    assert seen_steps == sorted(seen_steps) and seen_steps[-1] > seen_steps[0]  # resumed runs moved on
    assert interrupted >= 1  # at least one kill landed inside a save
