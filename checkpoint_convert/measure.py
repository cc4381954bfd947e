"""Wall time and resident memory of a conversion (the numbers ``skpo-convert`` and the benchmark report).

``peak_rss_mb`` is the process's lifetime peak (``ru_maxrss``: what the OS had to provide, imports
included); ``peak_delta_mb`` is sampled by a background thread every few milliseconds and counts
only the growth during the measured block, i.e. the converter's own working set.
"""
from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Measure:
    interval_s: float = 0.005
    seconds: float = 0.0
    start_rss: int = 0
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)

    def __enter__(self) -> "Measure":
        self.start_rss = self.peak_rss = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)

    @property
    def peak_delta_mb(self) -> float:
        return (self.peak_rss - self.start_rss) / 2**20

    @staticmethod
    def lifetime_peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
