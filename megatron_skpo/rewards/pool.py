"""A pool of grading worker processes with a hard per-item wall-clock timeout.

The workers run a :class:`~megatron_skpo.rewards.kinds.RewardPlan`: whichever registered reward
``reward.kind`` names (math, multiple_choice, code, format), a custom reward, or a weighted list.

Why processes and not threads: math-verify's own timeouts use ``signal.alarm``, which only works
in a main thread, and sympy can spin in C code that no signal interrupts. Each worker grades in
its main thread; the parent gives every item a deadline and, when it passes, SIGKILLs the worker
and starts a replacement. Timeouts and crashed workers score as incorrect and are counted in
:class:`RewardStats`; :meth:`RewardPool.score` never raises on model output.

Workers are fresh interpreters started with :mod:`subprocess` as ``python -m
megatron_skpo.rewards.grade_worker`` (:mod:`.grade_worker`): not ``fork`` (the parent may hold
threads, vLLM's or torch's, that a fork would copy in a broken state) and not multiprocessing's
``spawn``, which re-imports the caller's ``__main__`` and so breaks scripts without an
``if __name__ == "__main__":`` guard. Each worker imports this same ``megatron_skpo`` checkout
(its directory comes first on the worker's ``sys.path``), and dies with the process that started
it, even one killed with SIGKILL (:mod:`.grade_worker`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

from megatron_skpo.rewards.code import CodeOptions
from megatron_skpo.rewards.code_sandbox import SandboxLimits
from megatron_skpo.rewards.grader import STATUSES, Gold, Grade, RewardSpec, gold_text, reward_of
from megatron_skpo.rewards.kinds import Context, RewardPlan, Term
from megatron_skpo.rewards.reference import Reference

Ref = Union[Gold, Reference]  # a bare gold answer (math) or a whole reference

START_TIMEOUT_S = 120.0  # importing sympy + math-verify in a fresh process on a busy 2-core box
WORKER_MODULE = "megatron_skpo.rewards.grade_worker"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds megatron_skpo/
# Workers die with the thread that started them (PR_SET_PDEATHSIG, see grade_worker): start them
# all from this one thread, which lives as long as the process, not from the caller's thread.
_STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skpo-grader-start")


def start_worker(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, **popen_kwargs)`` run on the long-lived starter thread."""
    return _STARTER.submit(subprocess.Popen, argv, **popen_kwargs).result()


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


class Scored(NamedTuple):
    """Rewards, correctness (the grade's verdict, not a reward value) and counts of one batch."""

    rewards: list[float]
    correct: list[bool]
    stats: RewardStats


class _Worker:
    """One grading process and our end of its socket pair."""

    def __init__(self, plan: RewardPlan, memory_mb: int):
        mine, theirs = socket.socketpair()
        # -m puts the working directory first on sys.path: run the worker from our package root so
        # it imports this checkout (PYTHONPATH too, for interpreters started with -P/PYTHONSAFEPATH).
        path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno()), str(memory_mb), str(os.getpid())]
        with theirs:
            self.proc = start_worker(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                     cwd=_PACKAGE_ROOT, env={**os.environ, "PYTHONPATH": path})
        self.conn = Connection(mine.detach())
        self.conn.send(plan)  # buffered by the socket until the worker reads it
        self.ready = False
        self.started = time.monotonic()
        self.item: Optional[int] = None
        self.deadline = float("inf")

    def exit_code(self) -> Optional[int]:
        """The exit status once the process has ended (waits up to 5 s for a closing one)."""
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.exit_code()
        self.conn.close()


class RewardPool:
    """Batched, timeout-safe grading with any registered reward, a custom one or a weighted list.

    Args:
        workers: number of grading processes.
        timeout_s: hard wall-clock limit per item, measured from when a ready worker receives it
            (for code, it bounds all of a problem's tests together).
        extractors: answer extractors (names in ``rewards.extract.EXTRACTORS``): the answer stated
            last among ``boxed``/``the_answer_is`` wins; ``last_number`` is a fallback.
        spec: reward values (+1/-1 by default).
        memory_mb: address-space limit of each worker (0 = none).
        kind: the registered reward to run (``math``, ``multiple_choice``, ``code``, ``format``).
        plan: the whole plan instead (custom and weighted rewards; ``kind``, ``extractors``, ``spec``
            and ``code`` are then ignored).
        code: sandbox limits and partial credit of the code reward.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0,
                 extractors: Sequence[str] = ("boxed", "the_answer_is"),
                 spec: RewardSpec = RewardSpec(), memory_mb: int = 4096, kind: str = "math",
                 plan: Optional[RewardPlan] = None, code: CodeOptions = CodeOptions()):
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"RewardPool: need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        from megatron_skpo.rewards.extract import EXTRACTORS

        if plan is None:
            plan = RewardPlan((Term(kind),), Context(spec, tuple(extractors), code))
        for name in plan.context.extractors:
            EXTRACTORS.get(name)  # unknown names fail here, not in a worker
        plan.check()  # custom rewards import here: a clear error before any worker starts
        self.timeout_s, self.spec, self.plan = timeout_s, plan.context.spec, plan
        self._args = (plan, memory_mb)
        self._workers = [_Worker(*self._args) for _ in range(workers)]

    @classmethod
    def from_config(cls, cfg) -> "RewardPool":
        """Pool for a ``RewardConfig`` (``reward`` section)."""
        return cls(cfg.workers, cfg.timeout_s, memory_mb=cfg.memory_mb, plan=plan_of(cfg))

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def grade(self, responses: Sequence[str], refs: Sequence[Ref]) -> list[Grade]:
        """Grades in input order; timeouts and crashed workers become Grade("timeout"/"error").

        A reference is a :class:`Reference` or a bare gold answer; gold answers may be numbers
        (converted, ``3`` -> ``"3"``); any other type is a TypeError naming the item, raised before
        anything is graded.
        """
        if len(responses) != len(refs):
            raise ValueError(f"grade: {len(responses)} responses but {len(refs)} gold answers")
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        golds = [r if isinstance(r, Reference) else Reference(gold_text(r, i)) for i, r in enumerate(refs)]
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
                    raise RuntimeError(f"grading worker failed to start (exit code {w.exit_code()}; its error "
                                       f"output is above: `python -m {WORKER_MODULE}`)") from None
                self._replace(i, out, Grade("error", None, f"worker exited with code {w.exit_code()}"))
                continue
            if msg == "ready":
                w.ready = True
            elif isinstance(msg, tuple) and msg[:1] == ("failed",):
                raise RuntimeError(f"grading worker could not build the reward: {msg[1]}")
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
        self._workers[i] = _Worker(*self._args)

    def score(self, responses: Sequence[str], refs: Sequence[Ref]) -> tuple[list[float], RewardStats]:
        """Rewards in input order, and counts of every outcome."""
        scored = self.evaluate(responses, refs)
        return scored.rewards, scored.stats

    def evaluate(self, responses: Sequence[str], refs: Sequence[Ref]) -> Scored:
        """Rewards, correctness and counts, in input order."""
        t0 = time.monotonic()
        grades = self.grade(responses, refs)
        rewards = [reward_of(g.status, self.spec, g.score) for g in grades]
        stats = RewardStats(n=len(grades), seconds=time.monotonic() - t0)
        for g in grades:
            setattr(stats, g.status, getattr(stats, g.status) + 1)
            if g.status == "error" and len(stats.errors) < 5:
                stats.errors.append(g.detail)
        stats.mean_reward = sum(rewards) / len(rewards) if rewards else 0.0
        assert sum(getattr(stats, s) for s in STATUSES) == stats.n
        return Scored(rewards, [g.correct for g in grades], stats)


def plan_of(cfg) -> RewardPlan:
    """The plan a ``RewardConfig`` describes (paths of custom rewards made absolute: the workers
    start in the package's directory)."""
    spec = RewardSpec(cfg.correct, cfg.incorrect, cfg.format_penalty)
    c = cfg.code
    code = CodeOptions(SandboxLimits(wall_s=c.wall_s, cpu_s=c.cpu_s, memory_mb=c.memory_mb), c.partial_credit)
    ctx = Context(spec, tuple(cfg.answer_fallbacks), code)
    terms = cfg.terms or [cfg]  # terms are given exactly when kind is "weighted" (checked at load)
    return RewardPlan(tuple(Term(t.kind, getattr(t, "weight", 1.0), _absolute(t.custom)) for t in terms), ctx)


def _absolute(target: Optional[str]) -> Optional[str]:
    if target is None:
        return None
    module, sep, attr = target.rpartition(":")
    return f"{Path(module).resolve()}{sep}{attr}" if module.endswith(".py") else target
