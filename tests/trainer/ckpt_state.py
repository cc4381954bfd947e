"""Deterministic training state of a given step, shared by the kill-during-save test and its child."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.data.sampler import EpochSampler
from megatron_skpo.skpo.split import LengthTracker
from megatron_skpo.trainer.guard import NonFiniteGuard
from megatron_skpo.trainer.parts import StateDictPart, TrainProgress, get_rng_state, training_parts


class Weights:
    """A stand-in for the model part: a tensor big enough that writing it takes a moment."""

    def __init__(self, step: int = 0, numel: int = 1 << 18):
        self.w = torch.full((numel,), float(step))

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"].clone()


class SlowPart(StateDictPart):
    """Sleeps after writing so that a kill lands inside a save most of the time."""

    def __init__(self, obj, delay: float):
        super().__init__(obj)
        self.delay = delay

    def save(self, directory: Path) -> None:
        super().save(directory)
        time.sleep(self.delay)


def fresh():
    return (TrainProgress(), EpochSampler(10, seed=3), ValueTracker(), LengthTracker(), Weights(), NonFiniteGuard())


def make_state(step: int):
    """The objects as an uninterrupted run leaves them after ``step`` steps; seeds the global RNGs."""
    progress, sampler, values, lengths, weights, guard = fresh()
    for s in range(1, step + 1):
        keys = [f"q{i}" for i in sampler.next_indices(4)]
        values.observe(keys, torch.tensor([1.0, -1.0, 1.0, 0.0]), 0.01 * s)
        lengths.observe(keys[:2], torch.tensor([100.0 + s, 50.0]), 0.02)
    progress.step, progress.metrics_step, progress.consumed_prompts = step, step, 4 * step
    weights = Weights(step)
    guard.skipped_total = step // 3
    random.seed(step)
    np.random.seed(step)
    torch.manual_seed(step)
    random.random(), np.random.rand(), torch.rand(3)  # move the streams off their seeded start
    return progress, sampler, values, lengths, weights, guard


def parts_of(objs, slow: float = 0.0) -> dict:
    progress, sampler, values, lengths, weights, guard = objs
    parts = training_parts(0, progress, sampler, values, guard)
    parts["length_tracker"] = StateDictPart(lengths)
    parts["model"] = SlowPart(weights, slow) if slow else StateDictPart(weights)
    return parts


def snapshot(objs) -> dict:
    """Everything comparable about the state (and the global RNGs) as plain values."""
    progress, sampler, values, lengths, weights, guard = objs
    rng = get_rng_state()
    return {"guard": guard.state_dict(), "progress": progress.state_dict(), "sampler": sampler.state_dict(),
            "values": _plain(values.state_dict()), "lengths": _plain(lengths.state_dict()),
            "w": weights.w.tolist()[:4] + [float(weights.w.sum())],
            "rng": (rng["python"], rng["numpy"]["key"].tolist(), rng["numpy"]["pos"], rng["torch_cpu"].tolist())}


def _plain(state: dict) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
