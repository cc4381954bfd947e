"""The rollout queue: which steps' rollouts are requested, with which policy version, and which are
done -- the one component that owns the staleness bound (``rollout.max_staleness`` = k).

Versions: the policy version is the number of optimizer steps taken (``progress.step`` after a
step's update; 0 = the starting weights). A step's rollouts are requested right after a weight push,
so the engines generate them with the version pushed last, and every sample carries it.

Schedule (``due``): after step n's update and weight push (version n), the prompts of every step up
to n + 1 + k are drawn (with the trackers as of step n) and requested with version n. Step s is
thus requested with version s - 1 - k (or 0 at the start) and trained by version s - 1: its
staleness (trainer version - sample version) is at most k. k = 0 is the synchronous loop: step
n + 1's rollouts are made with version n (colocated: at the start of step n + 1, exactly as before
this queue existed). k = 1 is one-step-off: step n + 1 is generated while step n trains.

``take`` enforces the bound: an entry older than k versions (a resume with a smaller k, say) is
dropped, counted, and generated again with the current weights. A step at or below the last trained
one is never trained twice (counted as a duplicate).

Checkpointed (``state_dict``): every entry's step, version and prompts, and the finished rollouts;
an entry in flight at save time is requested again on resume -- with the same version when the
restored weights are that version (the normal case, so the resume is exact), else with the current
version (counted as regenerated).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_skpo.rollout.types import RolloutBatch, batch_from_state, batch_to_state

COUNTERS = ("dropped_stale_steps", "dropped_stale_samples", "duplicates", "regenerated")


@dataclass
class Entry:
    """One step's rollouts: requested (``batch`` None) or finished."""

    step: int
    version: int  # the policy version whose weights generate it
    keys: list[int]  # [P] the step's problems (``Problems.items`` indices), in step order
    batch: Optional[RolloutBatch] = None  # finished rollouts, all P prompts (``group`` = index into keys)
    submitted: bool = False  # sent to the engines in this process's life (not checkpointed)
    timing: dict = field(default_factory=dict)  # the workers' timing of ``batch`` (not checkpointed)


@dataclass
class RolloutQueue:
    max_staleness: int
    entries: dict[int, Entry] = field(default_factory=dict)
    next_step: int = 1  # the next step whose prompts are not drawn yet
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def due(self, trained_through: int, last_step: int) -> range:
        """Steps to draw and request now: up to ``trained_through + 1 + k``, not past ``last_step``."""
        return range(self.next_step, min(trained_through + 1 + self.max_staleness, last_step) + 1)

    def add(self, step: int, version: int, keys: list[int]) -> Entry:
        if step != self.next_step:
            raise RuntimeError(f"rollout queue: step {step} requested, expected {self.next_step}")
        self.entries[step] = e = Entry(step, version, list(keys))
        self.next_step = step + 1
        return e

    def pop(self, step: int, version_now: int) -> tuple[Entry, int]:
        """Step ``step``'s entry and how many samples were dropped for staleness (its rollouts are
        then cleared and its version moved to ``version_now``: the caller generates it again)."""
        if step <= version_now:  # trained already (steps and versions advance together)
            self.counters["duplicates"] += 1
            raise RuntimeError(f"rollout queue: step {step} was trained already (policy version {version_now})")
        e = self.entries.pop(step)
        dropped = 0
        if version_now - e.version > self.max_staleness:
            dropped = len(e.batch) if e.batch is not None else 0
            self.counters["dropped_stale_steps"] += 1
            self.counters["dropped_stale_samples"] += dropped
            e.version, e.batch, e.submitted = version_now, None, False
        return e, dropped

    def pending(self) -> list[Entry]:
        """Entries not sent to the engines yet in this process (after a resume: the in-flight ones)."""
        return [e for _, e in sorted(self.entries.items()) if e.batch is None and not e.submitted]

    def state_dict(self) -> dict[str, Any]:
        return {"max_staleness": self.max_staleness, "next_step": self.next_step, "counters": dict(self.counters),
                "entries": [{"step": e.step, "version": e.version, "keys": e.keys,
                             "batch": batch_to_state(e.batch) if e.batch is not None else None}
                            for _, e in sorted(self.entries.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; the bound stays this run's (a changed k is applied when each entry is taken)."""
        self.next_step = int(state["next_step"])
        self.counters = {k: int(state["counters"].get(k, 0)) for k in COUNTERS}
        self.entries = {}
        for e in state["entries"]:
            batch = batch_from_state(e["batch"]) if e["batch"] is not None else None
            self.entries[int(e["step"])] = Entry(int(e["step"]), int(e["version"]), [int(k) for k in e["keys"]],
                                                 batch)

    def settle(self, version_now: int) -> None:
        """After a restore: drop entries of steps trained already (counted; none in a consistent
        checkpoint), and move in-flight entries of another version to ``version_now`` (counted)."""
        for step in [s for s in self.entries if s <= version_now]:
            del self.entries[step]
            self.counters["duplicates"] += 1
        for e in self.entries.values():
            if e.batch is None and e.version != version_now:
                e.version = version_now
                self.counters["regenerated"] += 1

    def metrics(self) -> dict[str, float]:
        return {f"async/{k}_total": float(v) for k, v in self.counters.items()}
