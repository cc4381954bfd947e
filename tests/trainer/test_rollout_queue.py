"""The rollout queue's bookkeeping: the request schedule for each staleness bound, the bound at take
time (drops counted), duplicates, and its checkpoint state (finished rollouts kept, in-flight ones
regenerated with the right version)."""
from __future__ import annotations

import pytest
import torch

from megatron_skpo.rollout.types import RolloutBatch, Sample, SkpoRecord, batch_from_state, batch_to_state
from megatron_skpo.trainer.rollout_queue import RolloutQueue


def batch(version: int) -> RolloutBatch:
    up = Sample([1, 2], [3], [-0.1], "cut", 5, 0, "upstream", version=version)
    down = [Sample([3, 1, 2], [4, 5], [-0.2, -0.3], "stop", 5, 0, "downstream", parent=0, segment_span=(0, 1),
                   version=version) for _ in range(2)]
    rec = SkpoRecord(5, 2, [2, 1], [False, True], [2, 0], [0.1, 0.2], 0, 0, [1, 2])
    return RolloutBatch([up, *down], [rec], {"rollout/seconds": 1.5})


def simulate(k: int, steps: int) -> list[tuple[int, int]]:
    """The loop's order: request after the start and after each step's weight push; (step, version) trained."""
    q, trained = RolloutQueue(k), []
    for s in q.due(0, steps):
        q.add(s, 0, [s])
    for step in range(1, steps + 1):
        e, dropped = q.pop(step, step - 1)
        assert dropped == 0
        trained.append((step, e.version))
        for s in q.due(step, steps):
            q.add(s, step, [s])
    return trained


@pytest.mark.parametrize("k, versions", [
    (0, [0, 1, 2, 3, 4]),  # synchronous: step n trains on version n - 1
    (1, [0, 0, 1, 2, 3]),  # one-step-off: step n + 1 was generated while step n trained
    (2, [0, 0, 0, 1, 2]),  # bounded queue of 2
], ids=["k0", "k1", "k2"])
def test_schedule_and_staleness(k, versions):
    trained = simulate(k, 5)
    assert [v for _, v in trained] == versions
    assert max((s - 1) - v for s, v in trained) == k


def test_the_bound_drops_and_counts_stale_entries():
    """A step generated 3 versions ago under k = 1 (a resume with a smaller bound): dropped, counted,
    its version moved to the current one so that it is generated again."""
    q = RolloutQueue(1)
    e = q.add(1, 0, [7, 8])
    e.batch = batch(0)
    e2, dropped = q.pop(1, 0)
    assert dropped == 0 and e2.batch is not None
    q.next_step = 5
    q.add(5, 1, [9])
    q.entries[5].batch = batch(1)
    e3, dropped = q.pop(5, 4)  # staleness 3 > 1
    assert dropped == 3 and e3.batch is None and e3.version == 4
    assert q.counters["dropped_stale_steps"] == 1 and q.counters["dropped_stale_samples"] == 3


def test_a_trained_step_is_never_taken_again():
    q = RolloutQueue(0)
    q.add(1, 0, [1])
    with pytest.raises(RuntimeError, match="trained already"):
        q.pop(1, 1)
    assert q.counters["duplicates"] == 1
    with pytest.raises(RuntimeError, match="expected 2"):
        q.add(3, 0, [1])


def test_state_round_trip_and_settle():
    """Finished rollouts survive a checkpoint (torch.save, weights_only load); after a restore, an
    in-flight entry of the restored version is requested as it was, one of another version moves to
    it (counted), and a step trained already is dropped (counted)."""
    import io

    q = RolloutQueue(1)
    q.next_step = 3
    q.add(3, 2, [1, 2])
    q.entries[3].batch = batch(1)
    q.add(4, 2, [3, 4])  # in flight at save, same version as the weights saved with it
    q.add(5, 1, [5, 6])  # in flight, another version
    q.add(6, 2, [7])
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    r = RolloutQueue(1)
    r.load_state_dict(torch.load(buf, weights_only=True))
    assert r.next_step == 7 and sorted(r.entries) == [3, 4, 5, 6]
    assert batch_to_state(r.entries[3].batch) == batch_to_state(batch(1))
    r.entries[2] = r.entries.pop(6)  # pretend step 2 (trained already) were still queued
    r.entries[2].step = 2
    r.settle(2)
    assert sorted(r.entries) == [3, 4, 5] and r.counters["duplicates"] == 1
    assert r.entries[4].version == 2 and r.entries[5].version == 2 and r.counters["regenerated"] == 1
    assert [e.step for e in r.pending()] == [4, 5]


def test_batch_state_round_trip_keeps_versions_and_records():
    b = batch(3)
    back = batch_from_state(batch_to_state(b))
    assert [s.version for s in back.samples] == [3, 3, 3] and back.samples[1].segment_span == (0, 1)
    assert back.skpo == b.skpo and back.stats == b.stats and back.samples == b.samples
