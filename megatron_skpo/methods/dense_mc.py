"""Dense token-level Monte Carlo (VinePPO-style; the baseline the SKPO paper shows failing).

G responses per prompt, then K continuations from M prefixes of every response (phase ``mc``,
graded, never trained). V(q, o_<t) is the mean reward of the K continuations from the largest
estimated prefix position <= t (piecewise constant), with ``value_starts`` at the estimated
positions; the registered ``dense_mc`` estimator turns them into token advantages
(``algo.dense_mc.mode``). One phase ``single``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method
from megatron_skpo.methods.common import (CreditSettings, constant_groups, distinct_keys, group_advantages,
                                          observe_prompt_means, response_mask)
from megatron_skpo.methods.group import single_phase
from megatron_skpo.rollout.samplers.dense_mc import DenseMCSampler
from megatron_skpo.rollout.types import RolloutBatch


def mc_token_values(batch: RolloutBatch, rows: list[int], rewards: Tensor) -> tuple[Tensor, Tensor]:
    """([B, Rmax] V(q, o_<t), [B, Rmax] bool estimate starts) of ``rows`` from their ``mc`` rows."""
    est: dict[int, dict[int, list[float]]] = {}
    for i in batch.rows("mc"):
        s = batch.samples[i]
        est.setdefault(s.parent, {}).setdefault(s.position, []).append(float(rewards[i]))
    mask = response_mask(batch, rows)
    values = torch.zeros(mask.shape, dtype=torch.float64)
    starts = torch.zeros(mask.shape, dtype=torch.bool)
    for k, row in enumerate(rows):
        for pos, rs in sorted(est.get(row, {}).items()):
            values[k, pos:] = sum(rs) / len(rs)
            starts[k, min(pos, mask.shape[1] - 1)] = True
    return values, starts


def dense_mc_credit(s: CreditSettings, inp: CreditInput) -> Credit:
    rows = inp.batch.rows("single")
    r = inp.rewards[rows]
    values, starts = mc_token_values(inp.batch, rows, inp.rewards)
    dropped, metrics = constant_groups(s, inp.batch, rows, r, "single")
    adv = group_advantages(s, inp.batch, rows, r, token_values=values, value_starts=starts)
    observe_prompt_means(inp.tracker, inp.batch, rows, r, inp.drift_of(distinct_keys(inp.batch, rows)))
    return Credit(adv, inp.rewards, dropped, metrics)


@METHODS.register("dense_mc")
def build_dense_mc(cfg, tokenizer) -> Method:
    s, d = CreditSettings.from_config(cfg.algo), cfg.algo.dense_mc
    sampler = DenseMCSampler(cfg.algo.group_size, cfg.rollout.max_response_tokens, d.num_rollouts, d.num_positions,
                             cfg.rollout.timeout_s)
    return Method(sampler, lambda inp: dense_mc_credit(s, inp), single_phase(cfg.algo), drift_phase="single",
                  graded_phases=("single", "mc"), scored_phases=("single",))
