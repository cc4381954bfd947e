"""SKPO's two-phase objective (SKPO.md section 5), as a loss to MINIMISE:

    L = -(w_up * J_I + w_down * J_II) = w_up * L_I + w_down * L_II

- Upstream J_I (default ``ppo_clip``, aggregated ``seq-mean-token-mean``): for each selected
  segment s conditioned on q, (1/|s|) sum_t min(r_t A~, clip(r_t, 1-eps_low, 1+eps_high) A~), averaged
  over the segments (A~ the batch-normalised upstream advantage, broadcast over the segment tokens).
- Downstream J_II (default ``cispo``, aggregated ``token-mean``): (1/sum_i |o_i|) sum_i sum_t
  sg(clip(r_t)) A_i log pi_theta(o_it) over all downstream response tokens. The prompt q~ (segment
  included) is not in the downstream mask, so it carries no loss.
Each phase is an ordinary ``policy_objective`` with its own loss, aggregation mode and GLOBAL
counts (over all data-parallel ranks and micro-batches), so the sum over ranks of this function is
the global loss. A phase with no tokens on this rank ([0, T] tensors or an all-zero mask)
contributes exactly 0, without NaN, and still reports every metric key (count 0) so that the
trainer's all-reduce of the metrics lines up across ranks.
Defaults follow the paper: w_up = w_down = 0.5, no KL penalty, no entropy bonus.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from megatron_skpo.algo.aggregation import Count
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams, policy_objective
from megatron_skpo.algo.metrics import LossMetrics


@dataclass
class PhaseExtras:
    """Optional per-phase tensors; each [B, T] like that phase's ``PolicyLossInput``."""

    ref_log_probs: Optional[Tensor] = None  # reference policy (KL penalty, when kl_coef > 0)
    entropy: Optional[Tensor] = None  # per-token entropy of the current policy
    tis_weights: Optional[Tensor] = None  # detached TIS weights; None = TIS off


@dataclass(frozen=True)
class PhaseCounts:
    """Global denominators of one phase, summed by the trainer over ranks and micro-batches."""

    tokens: Count  # valid loss tokens
    seqs: Count  # sequences with at least one valid token


def skpo_objective(
    upstream: PolicyLossInput,
    downstream: PolicyLossInput,
    params: PolicyLossParams,
    up_counts: PhaseCounts,
    down_counts: PhaseCounts,
    *,
    upstream_loss: str = "ppo_clip",
    downstream_loss: str = "cispo",
    upstream_agg_mode: str = "seq-mean-token-mean",
    downstream_agg_mode: str = "token-mean",
    w_up: float = 0.5,
    w_down: float = 0.5,
    norm_length: Optional[float] = None,
    kl_estimator: str = "k3",
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    up_extras: Optional[PhaseExtras] = None,
    down_extras: Optional[PhaseExtras] = None,
) -> tuple[Tensor, LossMetrics]:
    """This rank's share of SKPO's loss ``w_up * L_I + w_down * L_II`` and its metrics.

    Args:
        upstream: [B_up, T_up] tensors of the selected segments (mask = segment tokens).
        downstream: [B_down, T_down] tensors of the downstream responses (mask = response tokens).
        params: clip bounds shared by both phases.
        up_counts, down_counts: each phase's global token and sequence counts.
        upstream_loss, downstream_loss: ``POLICY_LOSSES`` names; *_agg_mode: aggregation modes.
        w_up, w_down: phase weights.
        kl_estimator, kl_coef, entropy_coef: as in ``policy_objective``, shared by both phases.
        up_extras, down_extras: per-phase reference log-probs, entropy and TIS weights.
    Returns:
        (scalar loss, LossMetrics with "up/..." and "down/..." keys and the total "loss").
    """
    phases = (
        ("up", upstream, upstream_loss, upstream_agg_mode, up_counts, up_extras or PhaseExtras()),
        ("down", downstream, downstream_loss, downstream_agg_mode, down_counts, down_extras or PhaseExtras()),
    )
    weights = {"up": w_up, "down": w_down}
    metrics = LossMetrics()
    total: Optional[Tensor] = None
    for prefix, inp, loss_name, agg_mode, counts, extras in phases:
        loss, phase_metrics = policy_objective(
            inp, params, loss_name, agg_mode, counts.tokens, counts.seqs,
            ref_log_probs=extras.ref_log_probs, kl_estimator=kl_estimator, kl_coef=kl_coef,
            entropy=extras.entropy, entropy_coef=entropy_coef, tis_weights=extras.tis_weights,
            norm_length=norm_length,
        )
        weighted = weights[prefix] * loss
        total = weighted if total is None else total + weighted.to(total.device)
        metrics.merge(phase_metrics.prefixed(prefix + "/"))
    assert total is not None
    metrics.add_total("loss", total.detach())
    return total, metrics
