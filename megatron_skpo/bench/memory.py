"""Measured peak memory of a region, above what was allocated when it started.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
allocated at the start. CPU: the PyTorch profiler's allocator events (``profile_memory=True``
records every CPU allocation and free made by PyTorch's allocator with its byte count); the
peak is the maximum running sum of those events in time order. Both count only tensor memory
allocated inside the region, so the inputs (allocated before) are excluded and the gradients
and temporaries produced inside are included. The profiler slows the region down, so time it in
separate, unprofiled runs.
"""
from __future__ import annotations

from typing import Callable

import torch


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra bytes allocated while running ``fn()`` (whose results are dropped after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)
