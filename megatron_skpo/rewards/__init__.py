"""Verifiable rewards: a registry of reward kinds (math, multiple choice, code, format), custom and
weighted rewards, run in a worker pool with a hard per-item timeout.

Public API:
- :data:`REWARDS` / :func:`register_reward`: the registry ``reward.kind`` names (:mod:`.kinds`);
- :class:`RewardPool` ``.evaluate(responses, refs) -> Scored(rewards, correct, stats)`` (and
  ``.score`` -> ``(rewards, stats)``) for batches, with any kind, a custom or a weighted plan;
- :class:`Reference`: what a response is graded against (gold answer, tests, choices, extras);
- :func:`math_reward` ``(response, gold) -> float``: +1 correct, -1 otherwise, graded in a shared
  worker pool with a hard 5 s timeout per call (started on first use, closed at exit);
- :func:`extract_answer`, :class:`RewardSpec` (``pm1`` / ``zero_one`` / format penalty);
- :mod:`megatron_skpo.rewards.code_sandbox` runs programs in a bubblewrap sandbox (docs/security.md).
"""
from __future__ import annotations

import atexit
import threading
from typing import Optional

from megatron_skpo.rewards.extract import EXTRACTORS, extract_answer, normalize_answer
from megatron_skpo.rewards.grader import Gold, Grade, RewardSpec, gold_text, grade_math, reward_of
from megatron_skpo.rewards.kinds import REWARDS, Context, RewardPlan, Term, register_reward
from megatron_skpo.rewards.pool import RewardPool, RewardStats, Scored
from megatron_skpo.rewards.reference import Reference

__all__ = [
    "EXTRACTORS", "REWARDS", "Context", "Gold", "Grade", "Reference", "RewardPlan", "RewardPool", "RewardSpec",
    "RewardStats", "Scored", "Term", "extract_answer", "gold_text", "grade_math", "math_reward", "normalize_answer",
    "register_reward", "reward_of",
]

_default: Optional[RewardPool] = None
_lock = threading.RLock()


def _default_pool() -> RewardPool:
    global _default
    with _lock:
        if _default is None:
            _default = RewardPool(workers=1, timeout_s=5.0)
            atexit.register(_default.close)
        return _default


def math_reward(response: str, gold: Gold) -> float:
    """+1.0 if the final answer of ``response`` equals ``gold`` (math-verify), else -1.0.

    Timeouts (5 s) and parser crashes score -1.0 and never raise. ``gold`` may be a number
    (``3``); other types raise TypeError. Works from any script, with or without an
    ``if __name__ == "__main__":`` guard. For batches and counts of timeouts use
    :class:`RewardPool` directly.
    """
    with _lock:  # one shared worker: calls from several threads take turns
        rewards, _ = _default_pool().score([response], [gold])
    return rewards[0]
