"""SKPO upstream reward and advantage (docs/algorithm.md §3-4).

R_I(s) = mean of R_II over the G downstream responses of segment s (the Monte Carlo estimate);
the "w/o MC" ablation rewards s by its own full completion instead. The upstream advantage is
single-stream (SPO): A = R_I(s) - V_prev(q) with V_prev the tracker's value *before* this step's
update, then A~ = (A - mean_B A) / (std_B A + eps) over the batch of upstream samples.

``upstream_step`` does one step in the required order: read V_prev, compute A~, then observe.
The batch statistics are taken over the S segments passed in: pass the global batch (all
data-parallel ranks) to match the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from megatron_skpo.algo.advantages import whiten
from megatron_skpo.algo.tracker import Key, KLArg, ValueTracker

UpstreamRewardMode = Literal["mc", "own_completion"]


def upstream_rewards(downstream_rewards: Tensor, segment_index: Tensor, num_segments: int,
                     mode: UpstreamRewardMode = "mc", own_rewards: Optional[Tensor] = None) -> Tensor:
    """Upstream rewards R_I, [S] float.

    Args:
        downstream_rewards: [S*G] R_II of every downstream response.
        segment_index: [S*G] long in [0, S): the segment each downstream response continued.
        num_segments: S.
        mode: "mc" -> R_I(s) = mean of R_II over s's downstream responses (every segment needs one);
            "own_completion" (the "w/o MC" ablation) -> ``own_rewards`` [S], the reward of the
            upstream response that s was cut from, completed to the end.
    """
    if mode == "own_completion":
        if own_rewards is None or own_rewards.shape != (num_segments,):
            raise ValueError(f"upstream_rewards: mode 'own_completion' needs own_rewards [{num_segments}], "
                             f"got {None if own_rewards is None else tuple(own_rewards.shape)}")
        return own_rewards if own_rewards.is_floating_point() else own_rewards.float()
    if mode != "mc":
        raise ValueError(f"upstream_rewards: unknown mode {mode!r}")
    if downstream_rewards.dim() != 1 or segment_index.shape != downstream_rewards.shape:
        raise ValueError(f"upstream_rewards: downstream_rewards {tuple(downstream_rewards.shape)} and "
                         f"segment_index {tuple(segment_index.shape)} must be equal [S*G]")
    idx = segment_index.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_segments):
        raise ValueError(f"upstream_rewards: segment_index must lie in [0, {num_segments})")
    r = downstream_rewards if downstream_rewards.is_floating_point() else downstream_rewards.float()
    total = r.new_zeros(num_segments).index_add_(0, idx, r)
    count = r.new_zeros(num_segments).index_add_(0, idx, torch.ones_like(r))
    if bool((count == 0).any()):
        raise ValueError(f"upstream_rewards: segment {int((count == 0).nonzero()[0])} has no downstream response")
    return total / count


def upstream_advantages(r_up: Tensor, v_prev: Tensor, eps: float = 1e-6, batch_norm: bool = True,
                        std_unbiased: bool = True) -> Tensor:
    """A~ [S]: A = R_I - V_prev(q), then (A - mean_B) / (std_B + eps) if ``batch_norm``.

    std_B uses Bessel's correction by default (torch.std, like the group std); S = 1 or equal
    advantages give exactly 0.
    """
    if r_up.dim() != 1 or v_prev.shape != r_up.shape:
        raise ValueError(f"upstream_advantages: r_up {tuple(r_up.shape)} and v_prev {tuple(v_prev.shape)} "
                         "must be equal [S]")
    adv = r_up.to(torch.float64) - v_prev.to(torch.float64)
    return whiten(adv, eps, std_unbiased) if batch_norm else adv


@dataclass
class UpstreamStep:
    """One step's upstream quantities, each [S] float64."""

    rewards: Tensor  # R_I(s)
    v_prev: Tensor  # V(q) before this step's update (reward space)
    advantages: Tensor  # A~ (or A when batch_norm is off)


def upstream_step(tracker: ValueTracker, keys: Sequence[Key], r_up: Tensor, kl: KLArg,
                  eps: float = 1e-6, batch_norm: bool = True, std_unbiased: bool = True) -> UpstreamStep:
    """Read V_prev(q), compute A~ from it, then observe R_I with KL D (in that order).

    Args:
        tracker: the prompts' value tracker (updated in place).
        keys: [S] prompt id of each segment. r_up: [S] R_I. kl: [S] or scalar per-prompt KL D.
    A prompt repeated within the batch reads the same V_prev; its observations are then applied
    in batch order.
    """
    if len(keys) != r_up.numel():
        raise ValueError(f"upstream_step: {len(keys)} keys for {r_up.numel()} rewards")
    v_prev = tracker.value(keys)
    adv = upstream_advantages(r_up, v_prev, eps, batch_norm, std_unbiased)
    tracker.observe(keys, r_up, kl)
    return UpstreamStep(r_up.to(torch.float64), v_prev, adv)
