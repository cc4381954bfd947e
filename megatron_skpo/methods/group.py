"""The GRPO family (GRPO, Dr.GRPO, DAPO, CISPO, GSPO, RLOO, REINFORCE++): G independent responses per
prompt, the registered group-relative estimator ``algo.advantage``, one phase ``single`` trained
with ``algo.policy_loss`` aggregated by ``algo.loss_agg_mode``.

Choices (ours, where the papers are silent): each prompt's mean reward is also fed to the value
tracker, so ``train.prompt_sampling: prioritized`` works for every algorithm; DAPO's dynamic
sampling drops the rows of constant-reward groups and does not resample to refill the batch (the
count is logged); the overlong filter is applied to the loss masks (``trainer.rows``).
"""
from __future__ import annotations

from megatron_skpo.algo.objective import PhaseLoss
from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method
from megatron_skpo.methods.common import (CreditSettings, constant_groups, distinct_keys, group_advantages,
                                          observe_prompt_means)
from megatron_skpo.rollout.samplers.group import GroupSampler


def single_phase(algo) -> tuple[PhaseLoss]:
    return (PhaseLoss("single", algo.policy_loss, algo.loss_agg_mode),)


def group_credit(s: CreditSettings, inp: CreditInput) -> Credit:
    """Group-relative advantages over each prompt's G ``single`` rows."""
    rows = inp.batch.rows("single")
    r = inp.rewards[rows]
    dropped, metrics = constant_groups(s, inp.batch, rows, r, "single")
    adv = group_advantages(s, inp.batch, rows, r)
    observe_prompt_means(inp.tracker, inp.batch, rows, r, inp.drift_of(distinct_keys(inp.batch, rows)))
    return Credit(adv, inp.rewards, dropped, metrics)


@METHODS.register("group")
def build_group(cfg, tokenizer) -> Method:
    s = CreditSettings.from_config(cfg.algo)
    sampler = GroupSampler(cfg.algo.group_size, cfg.rollout.max_response_tokens, cfg.rollout.timeout_s)
    return Method(sampler, lambda inp: group_credit(s, inp), single_phase(cfg.algo), drift_phase="single")
