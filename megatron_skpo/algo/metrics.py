"""A typed record of loss metrics that the losses fill and the trainer reduces across ranks.

Every metric is a ``(sum, count)`` pair, so reducing is exact: sum the pairs over micro-batches and
data-parallel ranks, then divide once (``means``). A mean of per-rank means would weight ranks with
few tokens too much. "Totals" are additive quantities such as a rank's contribution to the global
loss: only their sums are reduced and ``means`` reports the sum.

The module never imports ``torch.distributed``: the trainer flattens the record with ``to_tensor``,
all-reduces that one tensor with whatever collective it owns, and reads it back with
``from_tensor`` (or does both through ``all_reduce(fn)``). Every rank must hold the same names, so
losses add every key even when their phase is empty on this rank (count 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import Tensor

Number = Union[float, int, Tensor]


def _scalar(value: Number, name: str) -> Tensor:
    t = torch.as_tensor(value).detach()
    if t.numel() != 1:
        raise ValueError(f"metric '{name}': expected a scalar, got shape {tuple(t.shape)}")
    return t.reshape(()).to(torch.float64)


@dataclass
class LossMetrics:
    """Named ``(sum, count)`` pairs; values stay tensors so adding them never syncs a GPU."""

    sums: dict[str, Tensor] = field(default_factory=dict)  # name -> [] float64
    counts: dict[str, Tensor] = field(default_factory=dict)  # name -> [] float64
    totals: set[str] = field(default_factory=set)  # names reported as sums, not means

    def add(self, name: str, value_sum: Number, count: Number) -> None:
        """Accumulate ``value_sum`` over ``count`` items (e.g. a masked token sum and the token count)."""
        if name in self.totals:
            raise ValueError(f"metric '{name}' is a total; use add_total")
        s, c = _scalar(value_sum, name), _scalar(count, name)
        self.sums[name] = self.sums[name] + s.to(self.sums[name].device) if name in self.sums else s
        self.counts[name] = self.counts[name] + c.to(self.counts[name].device) if name in self.counts else c

    def add_total(self, name: str, value: Number) -> None:
        """Accumulate an additive quantity (reported as its sum over micro-batches and ranks)."""
        if name in self.sums and name not in self.totals:
            raise ValueError(f"metric '{name}' is a mean; use add")
        self.totals.add(name)
        s = _scalar(value, name)
        self.sums[name] = self.sums[name] + s.to(self.sums[name].device) if name in self.sums else s
        self.counts[name] = torch.zeros((), dtype=torch.float64, device=s.device)

    def merge(self, other: "LossMetrics") -> "LossMetrics":
        """Add ``other``'s pairs into this record (in place) and return it."""
        for name in other.sums:
            if name in other.totals:
                self.add_total(name, other.sums[name])
            else:
                self.add(name, other.sums[name], other.counts[name])
        return self

    def prefixed(self, prefix: str) -> "LossMetrics":
        """A copy with every name prefixed (e.g. ``"up/"``)."""
        return LossMetrics(
            sums={prefix + k: v for k, v in self.sums.items()},
            counts={prefix + k: v for k, v in self.counts.items()},
            totals={prefix + k for k in self.totals},
        )

    def names(self) -> list[str]:
        """The layout of ``to_tensor``: sorted, hence identical on every rank with the same keys."""
        return sorted(self.sums)

    def to_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """Flatten to ``[2 * n]`` float64: the n sums, then the n counts, in ``names()`` order."""
        names = self.names()
        if not names:
            return torch.zeros(0, dtype=torch.float64, device=device)
        dev = device if device is not None else self.sums[names[0]].device
        return torch.stack([self.sums[k].to(dev) for k in names] + [self.counts[k].to(dev) for k in names])

    def from_tensor(self, flat: Tensor) -> "LossMetrics":
        """A new record with this record's layout and the values of ``flat`` (e.g. all-reduced)."""
        names = self.names()
        if flat.shape != (2 * len(names),):
            raise ValueError(f"flat metrics tensor: expected shape ({2 * len(names)},), got {tuple(flat.shape)}")
        flat = flat.detach().to(torch.float64)
        n = len(names)
        return LossMetrics(
            sums={k: flat[i] for i, k in enumerate(names)},
            counts={k: flat[n + i] for i, k in enumerate(names)},
            totals=set(self.totals),
        )

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> "LossMetrics":
        """Reduce across ranks with ``reduce_sum`` (returns the summed tensor; e.g. wraps dist.all_reduce)."""
        return self.from_tensor(reduce_sum(self.to_tensor()))

    def means(self) -> dict[str, float]:
        """``sum / count`` per metric (totals: the sum). Metrics with count 0 are left out."""
        flat = self.to_tensor(device="cpu").tolist()  # one device->host copy for all metrics
        n = len(flat) // 2
        out: dict[str, float] = {}
        for i, name in enumerate(self.names()):
            if name in self.totals:
                out[name] = flat[i]
            elif flat[n + i] > 0:
                out[name] = flat[i] / flat[n + i]
        return out
