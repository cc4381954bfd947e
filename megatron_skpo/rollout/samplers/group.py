"""GRPO-family sampler: G independent responses per prompt, all submitted at once.

Used by every group-relative algorithm (GRPO, Dr.GRPO, DAPO, CISPO, GSPO, RLOO, REINFORCE++) and,
with G = 1, by SPO's single-stream sampling. Rows are phase ``single``; group = prompt index.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_skpo.rollout.engine import Engine, GenRequest, generate
from megatron_skpo.rollout.samplers.base import PromptItem, Timer, check_unique_keys, phase_stats, rows_from
from megatron_skpo.rollout.types import RolloutBatch


class GroupSampler:
    def __init__(self, group_size: int, max_tokens: int, timeout_s: float = 3600.0):
        if group_size < 1 or max_tokens < 1:
            raise ValueError(f"GroupSampler: group_size ({group_size}) and max_tokens ({max_tokens}) must be >= 1")
        self.group_size, self.max_tokens, self.timeout_s = group_size, max_tokens, timeout_s

    def plan(self, prompts: Sequence[PromptItem], step: int, generator: torch.Generator) -> dict:
        return {}  # nothing drawn from trainer state

    def sample(self, engine: Engine, prompts: Sequence[PromptItem], step: int = 0,
               generator: Optional[torch.Generator] = None) -> RolloutBatch:
        check_unique_keys(prompts)
        timer = Timer()
        reqs = [GenRequest(p.prompt_ids, self.group_size, self.max_tokens, tag=i) for i, p in enumerate(prompts)]
        groups = generate(engine, reqs, self.timeout_s)
        samples = [row for i, (p, gens) in enumerate(zip(prompts, groups))
                   for row in rows_from(gens, p.prompt_ids, p.key, i, "single")]
        batch = RolloutBatch(samples)
        batch.stats = phase_stats(batch, timer)
        return batch
