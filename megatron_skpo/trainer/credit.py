"""Rewards and advantages of one rollout batch, one function per sampler family.

Every family returns :class:`Credit`: per-row token advantages ``[R_i]`` for the rows that train
(phases single/upstream/downstream), which prompts DAPO's dynamic sampling dropped, and metrics.
The maths are the registered estimators (``algo.advantages``, ``skpo.upstream``); this module only
routes rows to them and keeps the trackers (families are looked up once, in ``CREDIT``).

Design decisions (ours, where the papers are silent):
- KL D of the tracker updates: the batch-level drift of the previous step's updates (the token
  mean of k3 KL(old || updated) reported by its last mini-batch), the same scalar for every prompt
  (tracker.py allows the batch-mean fallback); 0 at the first step.
- GRPO-family and dense-MC runs also feed each prompt's mean reward to the value tracker, so that
  ``train.prompt_sampling: prioritized`` works for every algorithm.
- SKPO: the downstream advantage is ``algo.advantage`` over each segment's G rows (group = prompt);
  the upstream advantage is always batch-normalised (the paper's A~), ``algo.batch_norm_advantages``
  switches the downstream one; the length tracker observes each prompt once per step.
- Dynamic sampling (DAPO) drops the rows of groups whose rewards are all equal (for SKPO: the
  downstream group, with its segment kept) and does not resample to refill the batch; the count is
  logged. The overlong filter is applied to the loss masks (``trainer.rows``).
- Dense MC: V(q, o_<t) is the mean reward of the K continuations from the largest estimated prefix
  position <= t (piecewise constant), with ``value_starts`` at the estimated positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_skpo.algo.advantages import AdvantageInput, AdvantageParams, compute_advantages, group_stats
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.rollout.types import RolloutBatch
from megatron_skpo.skpo.split import LengthTracker, length_observations
from megatron_skpo.skpo.upstream import upstream_rewards, upstream_step


@dataclass
class CreditInput:
    batch: RolloutBatch
    rewards: Tensor  # [N] float64 graded rewards (0 for rows that are not graded: upstream)
    estimator: str  # algo.advantage
    params: AdvantageParams
    tracker: ValueTracker
    kl: float  # D for the tracker updates
    dynamic_sampling: bool = False
    correct: float = 1.0  # reward of a correct answer (accuracy metric)
    length_tracker: Optional[LengthTracker] = None
    length_source: str = "segment_plus_downstream"
    upstream_reward: str = "mc"


@dataclass
class Credit:
    advantages: dict[int, Tensor]  # row -> [R_i] token advantages (trained rows only)
    rewards: Tensor  # [N] float64, upstream rows filled with R_I
    dropped_rows: set[int] = field(default_factory=set)  # dynamic sampling
    metrics: dict[str, float] = field(default_factory=dict)


def response_mask(batch: RolloutBatch, rows: list[int]) -> Tensor:
    """[B, Rmax] bool: 1 on the response tokens of ``rows``."""
    lengths = torch.tensor([len(batch.samples[r].response_ids) for r in rows])
    return torch.arange(max(int(lengths.max()), 1))[None] < lengths[:, None]


def group_advantages(inp: CreditInput, rows: list[int], rewards: Tensor, baseline: Optional[Tensor] = None,
                     token_values: Optional[Tensor] = None, value_starts: Optional[Tensor] = None) -> dict[int, Tensor]:
    """The registered estimator over ``rows`` (groups = their ``group`` field); row -> [R_i]."""
    mask = response_mask(inp.batch, rows)
    group = torch.tensor([inp.batch.samples[r].group for r in rows])
    adv = compute_advantages(inp.estimator, AdvantageInput(rewards, group, mask, baseline, token_values, value_starts),
                             inp.params)
    return {r: adv[k, : len(inp.batch.samples[r].response_ids)].float() for k, r in enumerate(rows)}


def _zero_groups(inp: CreditInput, rows: list[int], rewards: Tensor, phase: str) -> tuple[set[int], dict]:
    """Rows of constant-reward groups (dropped if dynamic sampling) and the zero-advantage rate."""
    group = torch.tensor([inp.batch.samples[r].group for r in rows])
    constant = group_stats(rewards, group).constant
    n_groups = len(set(group.tolist()))
    n_zero = len({int(g) for g, c in zip(group, constant) if c})
    dropped = {r for r, c in zip(rows, constant) if c} if inp.dynamic_sampling else set()
    return dropped, {f"adv/{phase}/zero_group_rate": n_zero / max(n_groups, 1),
                     "dynamic_sampling/dropped_groups": float(n_zero if inp.dynamic_sampling else 0)}


def _observe_prompt_means(inp: CreditInput, rows: list[int], rewards: Tensor) -> None:
    keys = [inp.batch.samples[r].prompt_key for r in rows]
    firsts = list(dict.fromkeys(keys))
    means = torch.stack([rewards[[i for i, k in enumerate(keys) if k == key]].mean() for key in firsts])
    inp.tracker.observe(firsts, means.clamp(-1, 1), inp.kl)


def credit_group(inp: CreditInput) -> Credit:
    """GRPO, Dr.GRPO, DAPO, CISPO, GSPO, RLOO, REINFORCE++: group-relative over each prompt's G rows."""
    rows = inp.batch.rows("single")
    r = inp.rewards[rows]
    dropped, metrics = _zero_groups(inp, rows, r, "single")
    adv = group_advantages(inp, rows, r)
    _observe_prompt_means(inp, rows, r)
    return Credit(adv, inp.rewards, dropped, metrics)


def credit_single_stream(inp: CreditInput) -> Credit:
    """SPO: A = R - V_prev(q) (the tracker's pre-update value), then the tracker observes R."""
    rows = inp.batch.rows("single")
    keys = [inp.batch.samples[r].prompt_key for r in rows]
    r = inp.rewards[rows]
    baseline = inp.tracker.value(keys)
    adv = group_advantages(inp, rows, r, baseline=baseline)
    inp.tracker.observe(keys, r.clamp(-1, 1), inp.kl)
    return Credit(adv, inp.rewards, set(), {"adv/single/baseline_mean": float(baseline.mean())})


def credit_skpo(inp: CreditInput) -> Credit:
    """SKPO: downstream group-relative per segment; upstream R_I = mean R_II, A~ from the tracker."""
    b = inp.batch
    up, down = b.rows("upstream"), b.rows("downstream")
    r_down = inp.rewards[down]
    own = None
    if inp.upstream_reward == "own_completion":
        own = torch.stack([inp.rewards[rec.completion_row] for rec in b.skpo])
    r_up = upstream_rewards(r_down, b.segment_index(), len(up), inp.upstream_reward, own)
    keys = [b.samples[r].prompt_key for r in up]
    step = upstream_step(inp.tracker, keys, r_up, inp.kl, inp.params.eps, True, inp.params.std_unbiased)
    rewards = inp.rewards.clone()
    rewards[up] = step.rewards
    adv = group_advantages(inp, down, r_down)
    adv.update({row: torch.full((len(b.samples[row].response_ids),), float(a)) for row, a in zip(up, step.advantages)})
    dropped, metrics = _zero_groups(inp, down, r_down, "downstream")
    if inp.length_tracker is not None:
        seg = torch.tensor([len(b.samples[r].response_ids) for r in up])
        lens = torch.tensor([[len(b.samples[d].response_ids) for d in rec.downstream_rows] for rec in b.skpo])
        inp.length_tracker.observe(keys, length_observations(seg, lens, inp.length_source), inp.kl)
        metrics["skpo/L_q_mean"] = float(inp.length_tracker.lengths(keys).mean())
    metrics.update({"reward/upstream_mean": float(r_up.mean()), "adv/upstream/v_prev_mean": float(step.v_prev.mean()),
                    "skpo/t_q_mean": sum(rec.t_q for rec in b.skpo) / len(b.skpo),
                    "skpo/eos_before_rate": sum(sum(rec.eos_before) for rec in b.skpo) / sum(
                        len(rec.eos_before) for rec in b.skpo)})
    return Credit(adv, rewards, dropped, metrics)


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


def credit_dense_mc(inp: CreditInput) -> Credit:
    """Dense MC: token advantages from the Monte Carlo values of every response's prefixes."""
    rows = inp.batch.rows("single")
    r = inp.rewards[rows]
    values, starts = mc_token_values(inp.batch, rows, inp.rewards)
    dropped, metrics = _zero_groups(inp, rows, r, "single")
    adv = group_advantages(inp, rows, r, token_values=values, value_starts=starts)
    _observe_prompt_means(inp, rows, r)
    return Credit(adv, inp.rewards, dropped, metrics)


CREDIT: dict[str, Callable[[CreditInput], Credit]] = {
    "group": credit_group, "single_stream": credit_single_stream, "skpo": credit_skpo, "dense_mc": credit_dense_mc}
