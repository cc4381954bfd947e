"""Dense Monte-Carlo sampler (the baseline docs/algorithm.md §1 shows failing): G responses per prompt,
then K continuations from each of M prefixes of every response.

Positions (ours): for a response of R tokens, the distinct prefix lengths floor(R * j / M) for
j = 0..M-1 -- j = 0 is the prompt itself (V(q)), so VinePPO's V(t+1) - V(t) has its first term;
short responses get fewer distinct positions. Pipelined per prompt: a prompt's continuations are
submitted as soon as its G responses are done. Continuation rows are phase ``mc`` (graded for the
value estimates, never trained) with ``parent`` = the response row and ``position`` = prefix
length; they may use the response budget left after the prefix.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch

from megatron_skpo.rollout.engine import Engine, GenRequest, Generation, run_until_done
from megatron_skpo.rollout.samplers.base import PromptItem, Timer, check_unique_keys, phase_stats, rows_from
from megatron_skpo.rollout.types import RolloutBatch, Sample


def mc_positions(length: int, num_positions: int) -> list[int]:
    """Distinct prefix lengths floor(length * j / M), j = 0..M-1, ascending."""
    if num_positions < 1 or length < 0:
        raise ValueError(f"mc_positions: need num_positions >= 1 and length >= 0, got {num_positions}, {length}")
    return sorted({length * j // num_positions for j in range(num_positions)})


class DenseMCSampler:
    def __init__(self, group_size: int, max_tokens: int, num_rollouts: int, num_positions: int,
                 timeout_s: float = 3600.0):
        if min(group_size, max_tokens, num_rollouts, num_positions) < 1:
            raise ValueError("DenseMCSampler: group_size, max_tokens, num_rollouts, num_positions must be >= 1")
        self.group_size, self.max_tokens, self.timeout_s = group_size, max_tokens, timeout_s
        self.num_rollouts, self.num_positions = num_rollouts, num_positions

    def plan(self, prompts: Sequence[PromptItem], step: int, generator: torch.Generator) -> dict:
        return {}  # nothing drawn from trainer state

    def sample(self, engine: Engine, prompts: Sequence[PromptItem], step: int = 0,
               generator: Optional[torch.Generator] = None) -> RolloutBatch:
        check_unique_keys(prompts)
        timer = Timer()
        base: dict[int, list[Generation]] = {}
        conts: dict[tuple[int, int, int], list[Generation]] = {}

        def on_finished(tag: Hashable, gens: list[Generation]) -> None:
            if tag[0] == "mc":
                conts[tag[1:]] = gens
                return
            i = tag[1]
            base[i] = gens
            for j, g in enumerate(gens):
                for pos in mc_positions(len(g.token_ids), self.num_positions):
                    ids = prompts[i].prompt_ids + g.token_ids[:pos]
                    engine.submit(GenRequest(ids, self.num_rollouts, self.max_tokens - pos, tag=("mc", i, j, pos)))

        for i, p in enumerate(prompts):
            engine.submit(GenRequest(p.prompt_ids, self.group_size, self.max_tokens, tag=("base", i)))
        run_until_done(engine, on_finished, self.timeout_s)
        samples: list[Sample] = []
        for i, p in enumerate(prompts):
            samples.extend(rows_from(base[i], p.prompt_ids, p.key, i, "single"))
        for (i, j, pos), gens in sorted(conts.items()):
            prefix = prompts[i].prompt_ids + base[i][j].token_ids[:pos]
            samples.extend(rows_from(gens, prefix, prompts[i].key, i, "mc", parent=i * self.group_size + j,
                                     position=pos))
        batch = RolloutBatch(samples)
        batch.stats = phase_stats(batch, timer)
        return batch
