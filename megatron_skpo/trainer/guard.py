"""Skip updates whose loss or gradient norm is not finite, and count them.

The decision must be the same on every rank, so pass values that are already reduced across ranks
(Megatron's grad norm is; reduce the loss first). A skipped update zeroes the gradients and leaves
weights, optimizer state and schedule untouched; the counter is part of the checkpointed state.
"""
from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, int, torch.Tensor]


def _finite(x: Number) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return math.isfinite(float(x))


def is_finite_update(loss: Number, grad_norm: Number) -> bool:
    """True when the (scalar or tensor) loss and the gradient norm are all finite."""
    return _finite(loss) and _finite(grad_norm)


class NonFiniteGuard:
    """Counts skipped updates; ``metrics()`` gives this step's flag and the running total."""

    def __init__(self) -> None:
        self.skipped_total = 0
        self.skipped_step = 0

    def check(self, loss: Number, grad_norm: Number) -> bool:
        """True if the update may be applied; False (and counted) if it must be skipped."""
        ok = is_finite_update(loss, grad_norm)
        self.skipped_step += int(not ok)
        self.skipped_total += int(not ok)
        return ok

    def metrics(self) -> dict[str, int]:
        """``nonfinite/skipped``: updates skipped since the last call; ``nonfinite/skipped_total``."""
        out = {"nonfinite/skipped": self.skipped_step, "nonfinite/skipped_total": self.skipped_total}
        self.skipped_step = 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state.get("skipped_total"), int) or state["skipped_total"] < 0:
            raise ValueError(f"guard state: skipped_total must be an integer >= 0, got {state.get('skipped_total')!r}")
        self.skipped_total, self.skipped_step = state["skipped_total"], 0
