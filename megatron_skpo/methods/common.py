"""Credit helpers every family shares: route rows to the registered advantage estimators.

The maths are the registered estimators (``algo.advantages``); these functions only gather the
rows of one phase into the estimator's ``[B, T]`` layout and back, and count constant groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from megatron_skpo.algo.advantages import AdvantageInput, AdvantageParams, compute_advantages, group_stats
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.rollout.types import RolloutBatch
from megatron_skpo.settings import from_config


@dataclass(frozen=True)
class CreditSettings:
    """The advantage settings of ``cfg.algo`` (bound into a family's credit function at build time)."""

    estimator: str  # ADVANTAGES name
    params: AdvantageParams
    dynamic_sampling: bool = False  # DAPO: drop the rows of constant-reward groups

    @classmethod
    def from_config(cls, algo) -> "CreditSettings":
        """Every ``AdvantageParams`` field at the ``cfg.algo`` key it declares."""
        return cls(algo.advantage, from_config(AdvantageParams, algo, "algo"), algo.dynamic_sampling)


def response_mask(batch: RolloutBatch, rows: Sequence[int]) -> Tensor:
    """[B, Rmax] bool: 1 on the response tokens of ``rows``."""
    lengths = torch.tensor([len(batch.samples[r].response_ids) for r in rows])
    return torch.arange(max(int(lengths.max()), 1))[None] < lengths[:, None]


def group_advantages(s: CreditSettings, batch: RolloutBatch, rows: list[int], rewards: Tensor,
                     baseline: Optional[Tensor] = None, token_values: Optional[Tensor] = None,
                     value_starts: Optional[Tensor] = None) -> dict[int, Tensor]:
    """The registered estimator over ``rows`` (groups = their ``group`` field); row -> [R_i]."""
    mask = response_mask(batch, rows)
    group = torch.tensor([batch.samples[r].group for r in rows])
    adv = compute_advantages(s.estimator, AdvantageInput(rewards, group, mask, baseline, token_values, value_starts),
                             s.params)
    return {r: adv[k, : len(batch.samples[r].response_ids)].float() for k, r in enumerate(rows)}


def constant_groups(s: CreditSettings, batch: RolloutBatch, rows: list[int], rewards: Tensor,
                    phase: str) -> tuple[set[int], dict[str, float]]:
    """Rows of constant-reward groups (dropped under dynamic sampling) and the zero-advantage rate."""
    group = torch.tensor([batch.samples[r].group for r in rows])
    constant = group_stats(rewards, group).constant
    n_groups = len(set(group.tolist()))
    n_zero = len({int(g) for g, c in zip(group, constant) if c})
    dropped = {r for r, c in zip(rows, constant) if c} if s.dynamic_sampling else set()
    return dropped, {f"adv/{phase}/zero_group_rate": n_zero / max(n_groups, 1),
                     "dynamic_sampling/dropped_groups": float(n_zero if s.dynamic_sampling else 0)}


def observe_prompt_means(tracker: ValueTracker, batch: RolloutBatch, rows: list[int], rewards: Tensor,
                         drift: Tensor) -> None:
    """Feed each prompt's mean reward to the value tracker (prioritised sampling for every family).

    ``drift``: [K] D of the distinct prompts, in first-appearance order of ``rows``.
    """
    keys = [batch.samples[r].prompt_key for r in rows]
    firsts = list(dict.fromkeys(keys))
    means = torch.stack([rewards[[i for i, k in enumerate(keys) if k == key]].mean() for key in firsts])
    tracker.observe(firsts, means.clamp(-1, 1), drift)


def distinct_keys(batch: RolloutBatch, rows: list[int]) -> list:
    return list(dict.fromkeys(batch.samples[r].prompt_key for r in rows))
