"""PRIME (Process Reinforcement through IMplicit rEwards, Cui et al. 2025, arXiv 2502.01456) as a method
family: G responses per prompt, the accuracy filter, and advantages from the outcome reward plus the
per-token process rewards of an implicit PRM (``algo.advantage: prime``, ``algo/advantages.py``).

Per step (docs/algorithm.md §6):

1. the G responses of each prompt are graded; prompts whose group accuracy (the grader's verdicts)
   lies outside [``algo.prime.accuracy_lower``, ``accuracy_upper``] are filtered out: they train
   neither the PRM nor the policy (:func:`accuracy_filter`);
2. the trainer (``trainer/prm.py``) runs the PRM pi_prm and the frozen reference pi_ref (both start
   from the policy's weights) over the kept responses: r_t = beta (log pi_prm(y_t) - log pi_ref(y_t)),
   and updates the PRM by the cross-entropy of sigmoid(beta sum_t log pi_prm / pi_ref) against the
   verdict (``algo.prime.update``: after = rewards from the PRM before this update, PRIME's default);
3. credit: leave-one-out on the process and the outcome rewards, weighted 5 and 5, returns,
   whitened; the policy trains by PPO-clip (``algo.policy_loss``), token-mean.

Choices (ours, where the paper is silent): PRIME oversamples prompts (``oversample_factor``) and
keeps a batch of prompts that pass the filter; we sample ``train.prompts_per_step`` prompts and train
the ones that pass (the count is logged as ``prime/filtered_groups``), as DAPO's dynamic sampling
does here. The outcome reward of the advantage is the reward's score (``reward.kind``), the PRM's
label and the filter use the verdict (``correct``); for the math reward the two are the same 0/1.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method
from megatron_skpo.methods.common import CreditSettings, distinct_keys, observe_prompt_means, response_mask
from megatron_skpo.methods.group import single_phase
from megatron_skpo.rollout.samplers.group import GroupSampler
from megatron_skpo.rollout.types import RolloutBatch


@dataclass(frozen=True)
class PRMSettings:
    """What the trainer's PRM stage reads (``cfg.algo.prime``)."""

    beta: float = 0.05
    update: str = "after"  # after | before | none
    accuracy_lower: float = 0.2
    accuracy_upper: float = 0.8


def accuracy_filter(groups: Tensor, correct: Tensor, lower: float, upper: float) -> Tensor:
    """[B] bool: rows whose group's accuracy (mean of ``correct`` over the group) is in [lower, upper].

    ``groups``: [B] group id of each row; ``correct``: [B] bool verdicts."""
    _, inv = torch.unique(groups, return_inverse=True)
    n = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0, dtype=torch.float64)
    acc = n.index_add(0, inv, correct.double()) / n.index_add(0, inv, torch.ones_like(correct, dtype=torch.float64))
    tol = 1e-9  # 0.2 of G = 5 is 1/5 exactly in decimal, not in binary
    return (acc[inv] >= lower - tol) & (acc[inv] <= upper + tol)


def kept_rows(batch: RolloutBatch, correct: Tensor, prm: PRMSettings) -> list[int]:
    """The ``single`` rows that pass the accuracy filter, in batch order."""
    rows = batch.rows("single")
    if not rows:
        return []
    groups = torch.tensor([batch.samples[r].group for r in rows])
    keep = accuracy_filter(groups, correct[rows].bool(), prm.accuracy_lower, prm.accuracy_upper)
    return [r for r, k in zip(rows, keep.tolist()) if k]


def prime_credit(s: CreditSettings, prm: PRMSettings, inp: CreditInput) -> Credit:
    """Leave-one-out advantages of the kept rows from their outcome and process rewards."""
    from megatron_skpo.algo.advantages import AdvantageInput, compute_advantages

    b = inp.batch
    rows = b.rows("single")
    if inp.correct is None:
        raise ValueError("PRIME's credit needs the grader's verdicts (CreditInput.correct)")
    kept = kept_rows(b, inp.correct, prm)
    missing = [r for r in kept if r not in inp.process_rewards]
    if missing:
        raise ValueError(f"PRIME's credit: no process rewards for rows {missing[:5]} (the PRM stage scores every "
                         "kept row)")
    r = inp.rewards[rows]
    observe_prompt_means(inp.tracker, b, rows, r, inp.drift_of(distinct_keys(b, rows)))
    n_groups = len({b.samples[i].group for i in rows})
    n_kept = len({b.samples[i].group for i in kept})
    metrics = {"prime/filtered_groups": float(n_groups - n_kept), "prime/kept_group_rate": n_kept / max(n_groups, 1)}
    adv: dict[int, Tensor] = {}
    if kept:
        mask = response_mask(b, kept)
        process = torch.zeros(mask.shape, dtype=torch.float64)
        for k, row in enumerate(kept):
            process[k, : len(b.samples[row].response_ids)] = inp.process_rewards[row].double()
        group = torch.tensor([b.samples[i].group for i in kept])
        a = compute_advantages(s.estimator, AdvantageInput(inp.rewards[kept], group, mask, process_rewards=process),
                               s.params)
        adv = {row: a[k, : len(b.samples[row].response_ids)].float() for k, row in enumerate(kept)}
        valid = mask > 0
        metrics.update({"prime/process_reward_mean": float(process[valid].mean()),
                        "prime/process_reward_abs_max": float(process[valid].abs().max())})
    return Credit(adv, inp.rewards, set(rows) - set(kept), metrics)


@METHODS.register("prime")
def build_prime(cfg, tokenizer) -> Method:
    p = cfg.algo.prime
    prm = PRMSettings(p.beta, p.update, p.accuracy_lower, p.accuracy_upper)
    s = CreditSettings.from_config(cfg.algo)
    sampler = GroupSampler(cfg.algo.group_size, cfg.rollout.max_response_tokens, cfg.rollout.timeout_s)
    return Method(sampler, lambda inp: prime_credit(s, prm, inp), single_phase(cfg.algo), drift_phase="single",
                  prm=prm)
