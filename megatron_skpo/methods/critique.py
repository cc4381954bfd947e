"""Critique-GRPO (Zhang et al. 2025, arXiv 2506.03106) as a method family: each prompt's group is its
G - 1 initial responses and one refinement written from a critique (``rollout/samplers/critique.py``).

Credit: A_i = R_i - mean of the group's G rewards (``algo.advantage: dr_grpo``, no std), the same
on every token of row i. Two phases, one token mean over both (``PhaseLoss.pool``):

- ``single`` (the initial responses): ``algo.policy_loss``, by default ``unclipped``: -r A with
  r = pi_theta / pi_old and no clip;
- ``refine`` (the kept refinement, trained on q's own prompt): ``shaped_prob``: -A p / (p + gamma),
  p = pi_theta(token), gamma = ``algo.critique.shaping_gamma`` (0.1).

``reward`` and ``accuracy`` are the initial responses' (comparable with GRPO's); the refinements'
show in ``critique/*``.
"""
from __future__ import annotations


from megatron_skpo.algo.objective import PhaseLoss
from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method
from megatron_skpo.methods.common import (CreditSettings, constant_groups, distinct_keys, group_advantages,
                                          observe_prompt_means)
from megatron_skpo.rollout.samplers.critique import CritiqueSampler


def critique_phases(algo) -> tuple[PhaseLoss, PhaseLoss]:
    return (PhaseLoss("single", algo.policy_loss, "token-mean", pool="group", metric_prefix="init/"),
            PhaseLoss("refine", "shaped_prob", "token-mean", pool="group", metric_prefix="refine/"))


def critique_credit(s: CreditSettings, inp: CreditInput) -> Credit:
    """Group-relative advantages over each prompt's G - 1 initial rows and its refinement."""
    b = inp.batch
    rows = sorted(b.rows("single") + b.rows("refine"))
    r = inp.rewards[rows]
    dropped, metrics = constant_groups(s, b, rows, r, "group")
    adv = group_advantages(s, b, rows, r)
    initial = b.rows("single")
    observe_prompt_means(inp.tracker, b, initial, inp.rewards[initial], inp.drift_of(distinct_keys(b, initial)))
    refine = b.rows("refine")
    if inp.correct is not None and refine:
        metrics["critique/kept_refinement_accuracy"] = float(inp.correct[refine].double().mean())
    n = b.stats.get("rollout/count_refinements", 0.0)
    if n:
        metrics["critique/refinement_accuracy"] = b.stats.get("rollout/count_refinements_correct", 0.0) / n
    metrics["reward/refine_mean"] = float(inp.rewards[refine].mean()) if refine else 0.0
    return Credit(adv, inp.rewards, dropped, metrics)


@METHODS.register("critique")
def build_critique(cfg, tokenizer) -> Method:
    c = cfg.algo.critique
    sampler = CritiqueSampler(tokenizer, cfg.algo.group_size, cfg.rollout.max_response_tokens, critique=c.critique,
                              template=c.template, timeout_s=cfg.rollout.timeout_s)
    s = CreditSettings.from_config(cfg.algo)
    return Method(sampler, lambda inp: critique_credit(s, inp), critique_phases(cfg.algo), drift_phase="single",
                  graded_phases=("single", "refine"), scored_phases=("single",))
