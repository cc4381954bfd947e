"""SKPO as a method family: its sampler, its credit, its two phases and its length tracker.

Credit of one step (docs/algorithm.md, "Rewards" and "Advantages"):
- downstream: ``algo.advantage`` (group-relative: grpo, dr_grpo or rloo) over each segment's G
  rows (the group is the prompt); ``algo.batch_norm_advantages`` also batch-normalises them;
- upstream: R_I(s) = mean R_II of the segment's downstream group (``algo.skpo.upstream_reward: mc``)
  or the reward of the kept upstream sample's own completion (``own_completion``, the "w/o MC"
  ablation); A = R_I - V_prev(q) from the value tracker, batch-normalised (the paper's A~);
- the length tracker L_q observes each prompt once per step (``algo.skpo.length_source``).
Both trackers use the same per-prompt policy drift D (``CreditInput.drift``).
"""
from __future__ import annotations

import torch

from megatron_skpo.data.prompts import get_template
from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method
from megatron_skpo.methods.common import CreditSettings, constant_groups, group_advantages
from megatron_skpo.skpo.objective import skpo_phases
from megatron_skpo.skpo.sampler import SKPOSampler
from megatron_skpo.skpo.split import LengthTracker, length_observations
from megatron_skpo.skpo.upstream import upstream_rewards, upstream_step


def skpo_credit(s: CreditSettings, lengths: LengthTracker, length_source: str, upstream_reward: str,
                inp: CreditInput) -> Credit:
    b = inp.batch
    up, down = b.rows("upstream"), b.rows("downstream")
    r_down = inp.rewards[down]
    own = torch.stack([inp.rewards[rec.completion_row] for rec in b.skpo]) if upstream_reward == "own_completion" \
        else None
    r_up = upstream_rewards(r_down, b.segment_index(), len(up), upstream_reward, own)
    keys = [b.samples[r].prompt_key for r in up]
    drift = inp.drift_of(keys)
    step = upstream_step(inp.tracker, keys, r_up, drift, s.params.eps, True, s.params.std_unbiased)
    rewards = inp.rewards.clone()
    rewards[up] = step.rewards
    adv = group_advantages(s, b, down, r_down)
    adv.update({row: torch.full((len(b.samples[row].response_ids),), float(a)) for row, a in zip(up, step.advantages)})
    dropped, metrics = constant_groups(s, b, down, r_down, "downstream")
    seg = torch.tensor([len(b.samples[r].response_ids) for r in up])
    lens = torch.tensor([[len(b.samples[d].response_ids) for d in rec.downstream_rows] for rec in b.skpo])
    lengths.observe(keys, length_observations(seg, lens, length_source), drift)
    metrics.update({"skpo/L_q_mean": float(lengths.lengths(keys).mean()),
                    "reward/upstream_mean": float(r_up.mean()), "adv/upstream/v_prev_mean": float(step.v_prev.mean()),
                    "skpo/t_q_mean": sum(rec.t_q for rec in b.skpo) / len(b.skpo),
                    "skpo/eos_before_rate": sum(sum(rec.eos_before) for rec in b.skpo) / sum(
                        len(rec.eos_before) for rec in b.skpo)})
    return Credit(adv, rewards, dropped, metrics)


@METHODS.register("skpo")
def build_skpo(cfg, tokenizer) -> Method:
    k, t, r = cfg.algo.skpo, cfg.algo.tracker, cfg.rollout
    init = k.init_length if k.init_length is not None else min(1024.0, float(r.max_response_tokens))
    lengths = LengthTracker(init, t.rho_min, t.rho_max, t.d_half, unseen=k.unseen_length)
    sampler = SKPOSampler(tokenizer, cfg.algo.group_size, r.max_response_tokens, selector=k.selection,
                          skip_mode=k.skip_mode, downstream_budget=r.downstream_budget,
                          template=k.skip_template or get_template(cfg.data.prompt_template).skip,
                          split_min_frac=k.split_min_frac, split_max_frac=k.split_max_frac, split_mode=k.split_mode,
                          length_tracker=lengths, own_completion=k.upstream_reward == "own_completion",
                          seed=r.seed, timeout_s=r.timeout_s)
    s = CreditSettings.from_config(cfg.algo)
    phases = skpo_phases(k.upstream_loss, k.downstream_loss, k.upstream_agg_mode, k.downstream_agg_mode, k.w_up,
                         k.w_down, k.phase_weighting)
    graded = ("downstream", "mc") if k.upstream_reward == "own_completion" else ("downstream",)
    source, upstream_reward = k.length_source, k.upstream_reward  # read at build time, like every setting
    return Method(sampler, lambda inp: skpo_credit(s, lengths, source, upstream_reward, inp), phases,
                  drift_phase="upstream", state={"length_tracker": lengths}, graded_phases=graded,
                  scored_phases=("downstream",))
