"""A pool of grading worker processes with a hard per-item wall-clock timeout.

Why processes and not threads: math-verify's own timeouts use ``signal.alarm``, which only works
in a main thread, and sympy can spin in C code that no signal interrupts. Each worker grades in
its main thread; the parent gives every item a deadline and, when it passes, SIGKILLs the worker
and starts a replacement. Timeouts and crashed workers score as incorrect and are counted in
:class:`RewardStats`; :meth:`RewardPool.score` never raises on model output.

Workers are started with the ``spawn`` method: the parent may hold threads (vLLM, torch) that a
``fork`` would copy in a broken state.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Optional, Sequence

from megatron_skpo.rewards.grader import STATUSES, Grade, RewardSpec, grade_math, reward_of

START_TIMEOUT_S = 120.0  # importing sympy + math-verify in a fresh process on a busy 2-core box


def _worker_main(conn: Connection, extractors: tuple[str, ...], memory_mb: int) -> None:
    """Worker loop: receive (response, gold), send back a Grade; runs until the pipe closes."""
    import logging
    import resource

    # We turn math-verify's signal timeouts off on purpose (the parent kills slow workers).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if memory_mb > 0:  # a runaway sympy expansion fails with MemoryError instead of swapping
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    grade_math("\\boxed{1}", "1", extractors)  # warm the imports before reporting ready
    conn.send("ready")
    while True:
        try:
            response, gold = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(grade_math(response, gold, extractors))


@dataclass
class RewardStats:
    """Counts of one :meth:`RewardPool.score` call (all of them, timeouts included)."""

    n: int = 0
    correct: int = 0
    incorrect: int = 0
    no_answer: int = 0
    timeout: int = 0
    error: int = 0
    mean_reward: float = 0.0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # first few error texts, for logs

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("errors")
        return d


class _Worker:
    def __init__(self, ctx, extractors: tuple[str, ...], memory_mb: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, extractors, memory_mb), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.item: Optional[int] = None
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardPool:
    """Batched, timeout-safe math grading.

    Args:
        workers: number of grading processes.
        timeout_s: hard wall-clock limit per item, measured from when a ready worker receives it.
        extractors: answer extraction order (names in ``rewards.extract.EXTRACTORS``).
        spec: reward values (+1/-1 by default).
        memory_mb: address-space limit of each worker (0 = none).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0,
                 extractors: Sequence[str] = ("boxed", "the_answer_is"),
                 spec: RewardSpec = RewardSpec(), memory_mb: int = 4096):
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"RewardPool: need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        from megatron_skpo.rewards.extract import EXTRACTORS

        for name in extractors:
            EXTRACTORS.get(name)  # unknown names fail here, not in a worker
        self.timeout_s, self.spec = timeout_s, spec
        self._args = (tuple(extractors), memory_mb)
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, *self._args) for _ in range(workers)]

    @classmethod
    def from_config(cls, cfg) -> "RewardPool":
        """Pool for a ``RewardConfig`` (``reward`` section) of kind ``math``."""
        if cfg.kind != "math":
            raise ValueError(f"reward.kind: RewardPool grades math answers, got {cfg.kind!r}")
        spec = RewardSpec(cfg.correct, cfg.incorrect, cfg.format_penalty)
        return cls(cfg.workers, cfg.timeout_s, cfg.answer_fallbacks, spec, cfg.memory_mb)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def grade(self, responses: Sequence[str], golds: Sequence[str]) -> list[Grade]:
        """Grades in input order; timeouts and crashed workers become Grade("timeout"/"error")."""
        if len(responses) != len(golds):
            raise ValueError(f"grade: {len(responses)} responses but {len(golds)} gold answers")
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        out: list[Optional[Grade]] = [None] * len(responses)
        todo = deque(range(len(responses)))
        while todo or any(w.item is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.item is None and todo:
                    w.item = todo.popleft()
                    w.conn.send((responses[w.item], golds[w.item]))
                    w.deadline = time.monotonic() + self.timeout_s
            self._wait_and_collect(out)
        return out  # type: ignore[return-value]

    def _wait_and_collect(self, out: list[Optional[Grade]]) -> None:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.item is not None]
        wait([w.conn for w in self._workers], timeout=max(0.0, min(deadlines, default=now + 1.0) - now))
        for i, w in enumerate(self._workers):
            try:
                msg = w.conn.recv() if w.conn.poll() else None
            except (EOFError, OSError):  # worker died (segfault, OOM kill): the item is an error
                if not w.ready:
                    raise RuntimeError(f"grading worker failed to start (exit code {w.proc.exitcode})") from None
                self._replace(i, out, Grade("error", None, f"worker exited with code {w.proc.exitcode}"))
                continue
            if msg == "ready":
                w.ready = True
            elif isinstance(msg, Grade):
                out[w.item], w.item, w.deadline = msg, None, float("inf")
            elif w.item is not None and time.monotonic() > w.deadline:
                self._replace(i, out, Grade("timeout"))
            elif not w.ready and time.monotonic() - w.started > START_TIMEOUT_S:
                raise RuntimeError(f"grading worker did not start within {START_TIMEOUT_S:.0f} s")

    def _replace(self, i: int, out: list[Optional[Grade]], grade: Grade) -> None:
        w = self._workers[i]
        if w.item is not None:
            out[w.item] = grade
        w.kill()
        self._workers[i] = _Worker(self._ctx, *self._args)

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> tuple[list[float], RewardStats]:
        """Rewards (``spec`` values) in input order, and counts of every outcome."""
        t0 = time.monotonic()
        grades = self.grade(responses, golds)
        rewards = [reward_of(g.status, self.spec) for g in grades]
        stats = RewardStats(n=len(grades), seconds=time.monotonic() - t0)
        for g in grades:
            setattr(stats, g.status, getattr(stats, g.status) + 1)
            if g.status == "error" and len(stats.errors) < 5:
                stats.errors.append(g.detail)
        stats.mean_reward = sum(rewards) / len(rewards) if rewards else 0.0
        assert sum(getattr(stats, s) for s in STATUSES) == stats.n
        return rewards, stats
