"""A loss made of phases: ``L = sum_p w_p * L_p``, each phase an ordinary ``policy_objective`` with its
own policy loss, aggregation mode and GLOBAL counts.

Every method family declares its phases (``PhaseLoss``): the GRPO family and SPO train one phase
(``single``) with ``algo.policy_loss``; SKPO trains ``upstream`` (J_I, PPO-clip over the selected
segment) and ``downstream`` (J_II, CISPO over the skip-connected group) with weights w_up, w_down.
Because each phase is normalised by its own global counts (summed over data-parallel ranks and
micro-batches by the trainer), the sum over ranks of this function is the global loss. Phases of
one ``pool`` share the sum of their counts instead: with token-mean, their sum is one token mean
over all their tokens (Critique-GRPO's initial responses and refinements).

A phase with no tokens on this rank ([0, T] tensors or an all-zero mask) contributes exactly 0,
without NaN, and still reports every metric key (count 0), so the trainer's all-reduce of the
metrics lines up across ranks. Metrics of a one-phase loss keep their plain names ("loss",
"kl_old_k3", ...); with several phases each phase's metrics carry its ``metric_prefix`` and the
weighted total is "loss".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from torch import Tensor

from megatron_skpo.algo.aggregation import Count
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams, policy_objective
from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.settings import setting


@dataclass(frozen=True)
class PhaseLoss:
    """How one phase's rows train."""

    phase: str  # the rows' phase in the rollout batch: "single", "upstream" or "downstream"
    loss: str  # POLICY_LOSSES name
    agg_mode: str  # aggregation.AGG_MODES mode
    weight: float = 1.0
    metric_prefix: str = ""  # "up/" / "down/" for SKPO; "" keeps a one-phase loss's plain names
    # phases with the same pool share one denominator: the sum of their counts (Critique-GRPO's token
    # mean over a group of initial responses and a refinement); None = the phase's own counts
    pool: Optional[str] = None


def _tis_cap(tis) -> Optional[float]:
    return tis.cap if tis.enabled else None


@dataclass(frozen=True)
class ObjectiveSettings:
    """What every phase shares; each field declares its key under ``cfg.algo`` and the trainer
    builds this by those keys (``settings.from_config``; ``params`` is built the same way)."""

    params: PolicyLossParams = field(default_factory=PolicyLossParams)
    norm_length: Optional[float] = setting(None, "norm_length", float)  # seq-mean-token-sum-norm's constant
    kl_coef: float = setting(0.0, "kl.coef")
    kl_estimator: str = setting("k3", "kl.estimator")
    entropy_coef: float = setting(0.0, "entropy_coef")
    tis_cap: Optional[float] = setting(None, "tis", _tis_cap)  # None = truncated importance sampling off
    # OFF_POLICY_CORRECTIONS name, for rows of an older policy version
    off_policy: str = setting("decoupled", "off_policy")
    off_policy_cap: float = setting(5.0, "off_policy_cap")  # decoupled: cap of pi_prox / mu on stale rows


@dataclass
class PhaseExtras:
    """Optional per-phase tensors; each [B, T] like that phase's ``PolicyLossInput``."""

    ref_log_probs: Optional[Tensor] = None  # reference policy (KL penalty, when kl_coef > 0)
    entropy: Optional[Tensor] = None  # per-token entropy of the current policy
    tis_weights: Optional[Tensor] = None  # detached per-token weights (TIS, off-policy correction); None = 1


@dataclass(frozen=True)
class PhaseCounts:
    """Global denominators of one phase, summed by the trainer over ranks and micro-batches."""

    tokens: Count  # valid loss tokens
    seqs: Count  # sequences with at least one valid token


def pooled_counts(phases: tuple[PhaseLoss, ...], counts: Mapping[str, PhaseCounts]) -> dict[str, PhaseCounts]:
    """Each phase's denominators: its own, or the sum over every phase of its ``pool``."""
    out = dict(counts)
    for p in phases:
        if p.pool is not None:
            members = [q.phase for q in phases if q.pool == p.pool]
            out[p.phase] = PhaseCounts(sum(counts[m].tokens for m in members), sum(counts[m].seqs for m in members))
    return out


def phased_objective(phases: tuple[PhaseLoss, ...], inputs: Mapping[str, PolicyLossInput],
                     counts: Mapping[str, PhaseCounts], s: ObjectiveSettings,
                     extras: Optional[Mapping[str, PhaseExtras]] = None) -> tuple[Tensor, LossMetrics]:
    """This rank's share of ``sum_p w_p L_p`` and its metrics.

    Args:
        phases: the method's phases, in order.
        inputs: phase -> its [B_p, T_p] ``PolicyLossInput`` on this rank (B_p may be 0).
        counts: phase -> its global token/sequence counts.
        s: clip bounds, KL, entropy, TIS and the Dr.GRPO length constant.
        extras: phase -> reference log-probs, entropy and TIS weights.
    """
    if not phases:
        raise ValueError("phased_objective: no phases")
    metrics, total = LossMetrics(), None
    counts = pooled_counts(phases, counts)
    for p in phases:
        x = (extras or {}).get(p.phase) or PhaseExtras()
        loss, phase_metrics = policy_objective(
            inputs[p.phase], s.params, p.loss, p.agg_mode, counts[p.phase].tokens, counts[p.phase].seqs,
            ref_log_probs=x.ref_log_probs, kl_estimator=s.kl_estimator, kl_coef=s.kl_coef, entropy=x.entropy,
            entropy_coef=s.entropy_coef, tis_weights=x.tis_weights, norm_length=s.norm_length)
        weighted = p.weight * loss
        total = weighted if total is None else total + weighted.to(total.device)
        metrics.merge(phase_metrics.prefixed(p.metric_prefix) if p.metric_prefix else phase_metrics)
    if len(phases) > 1 or phases[0].metric_prefix:
        metrics.add_total("loss", total.detach())
    return total, metrics
