"""What every sampler shares: the prompt item, the sampler interface and row bookkeeping."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Hashable, Optional, Protocol, Sequence

import torch

from megatron_skpo.data.prompts import PromptSlot
from megatron_skpo.rollout.engine import Engine, Generation
from megatron_skpo.rollout.types import Phase, RolloutBatch, Sample


@dataclass
class PromptItem:
    """One problem of the rollout batch."""

    key: Hashable  # dataset problem id (tracker key, gold-answer lookup)
    problem: str  # q: the content of the prompt's problem slot (SKPO renders [s, q] in the same slot)
    prompt_ids: list[int]  # [P] the rendered prompt of q (template, chat template, generation prompt)
    slot: Optional[PromptSlot] = None  # how q's prompt is rendered; None = a chat user turn holding q

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError(f"PromptItem {self.key!r}: prompt_ids is empty")


class Sampler(Protocol):
    def plan(self, prompts: Sequence[PromptItem], step: int, generator: torch.Generator) -> dict:
        """What ``sample`` draws from trainer-side state (SKPO: the split positions from the length
        tracker), as keyword arguments for ``sample``: a rollout worker in another process gets them
        with the request. ``sample(..., generator)`` without them draws the same from ``generator``."""

    def sample(self, engine: Engine, prompts: Sequence[PromptItem], step: int = 0,
               generator: Optional[torch.Generator] = None) -> RolloutBatch:
        """Generate one step's rollouts for ``prompts``; ``generator`` drives the sampler's own random
        choices (SKPO's split and selection), seeded per step by the trainer."""


def rows_from(gens: Sequence[Generation], prompt_ids: list[int], key: Hashable, group: int, phase: Phase,
              **extra) -> list[Sample]:
    """One :class:`Sample` per generation of the same prompt."""
    return [Sample(list(prompt_ids), g.token_ids, g.logprobs, g.finish_reason, key, group, phase, **extra)
            for g in gens]


def check_unique_keys(prompts: Sequence[PromptItem]) -> None:
    seen = set()
    for p in prompts:
        if p.key in seen:
            raise ValueError(f"prompt key {p.key!r} appears twice in one rollout batch")
        seen.add(p.key)


class Timer:
    """Wall and process CPU time (the latter counts every thread of this process, e.g. an in-process
    vLLM's, and is less disturbed by other processes sharing the machine)."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_start


def phase_stats(batch: RolloutBatch, timer: Timer) -> dict[str, float]:
    """Wall/CPU time, generated tokens per phase and overall tokens/s."""
    seconds = timer.seconds()
    stats = {"rollout/seconds": seconds, "rollout/cpu_seconds": timer.cpu_seconds()}
    total = 0
    for s in batch.samples:
        stats[f"rollout/tokens_{s.phase}"] = stats.get(f"rollout/tokens_{s.phase}", 0.0) + len(s.response_ids)
        total += len(s.response_ids)
    stats["rollout/tokens"] = float(total)
    stats["rollout/generated_tokens"] = float(total)  # samplers that discard samples add them
    stats["rollout/tokens_per_s"] = total / max(seconds, 1e-9)
    return stats
