"""Deterministic, resumable sampling order over a dataset of ``n`` problems.

Epoch ``e`` visits ``permutation(n)`` drawn from a NumPy generator seeded with ``(seed, e)``, so
the order depends only on (seed, epoch) and never on how many batches were drawn before, how the
run was split into restarts, or the process that draws it. The state is (epoch, position); a run
resumed from ``state_dict()`` mid-epoch continues with exactly the indices it would have drawn.
"""
from __future__ import annotations

import numpy as np


class EpochSampler:
    """Endless stream of dataset indices, one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError(f"EpochSampler: dataset is empty (n={n})")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` indices; crosses epoch boundaries (a batch may span two epochs)."""
        out: list[int] = []
        while len(out) < count:
            take = min(count - len(out), self.n - self.pos)
            out.extend(int(i) for i in self._order[self.pos : self.pos + take])
            self.pos += take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state: {key}={state[key]!r} does not match this sampler's "
                                 f"{getattr(self, key)!r} (different dataset or seed)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)
