"""SKPO's two-phase objective (docs/algorithm.md, "Losses"), as a loss to MINIMISE:

    L = -(w_up * J_I + w_down * J_II) = w_up * L_I + w_down * L_II

- Upstream J_I (default ``ppo_clip``, aggregated ``seq-mean-token-mean``): for each selected
  segment s conditioned on q, (1/|s|) sum_t min(r_t A~, clip(r_t, 1-eps_low, 1+eps_high) A~), averaged
  over the segments (A~ the batch-normalised upstream advantage, broadcast over the segment tokens).
- Downstream J_II (default ``cispo``, aggregated ``token-mean``): (1/sum_i |o_i|) sum_i sum_t
  sg(clip(r_t)) A_i log pi_theta(o_it) over all downstream response tokens. The prompt q~ (segment
  included) is not in the downstream mask, so it carries no loss.

Both are phases of :func:`megatron_skpo.algo.objective.phased_objective` (each with its own loss,
aggregation mode and GLOBAL counts); :func:`skpo_phases` builds them from the SKPO config section,
and the trainer uses exactly those. Defaults follow the paper: w_up = w_down = 0.5, no KL
penalty, no entropy bonus.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams
from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.algo.objective import ObjectiveSettings, PhaseCounts, PhaseExtras, PhaseLoss, phased_objective

__all__ = ["PhaseCounts", "PhaseExtras", "skpo_phases", "skpo_objective"]


def skpo_phases(upstream_loss: str = "ppo_clip", downstream_loss: str = "cispo",
                upstream_agg_mode: str = "seq-mean-token-mean", downstream_agg_mode: str = "token-mean",
                w_up: float = 0.5, w_down: float = 0.5, weighting: str = "fixed") -> tuple[PhaseLoss, PhaseLoss]:
    """SKPO's (upstream, downstream) phases; metrics are prefixed "up/" and "down/".

    ``weighting="token_pool"`` (ours, ``algo.skpo.phase_weighting``) gives both phases one denominator,
    the sum of their token counts: ``(w_up sum_up l_t + w_down sum_down l_t) / (N_up + N_down)``. The
    paper's fixed weights let ~90 segment tokens a step pull as hard as ~1,250 downstream tokens.
    """
    if weighting not in ("fixed", "token_pool"):
        raise ValueError(f"skpo_phases: weighting must be fixed or token_pool, got {weighting!r}")
    if weighting == "token_pool" and not upstream_agg_mode == downstream_agg_mode == "token-mean":
        raise ValueError("skpo_phases: token_pool needs token-mean aggregation in both phases")
    pool = "skpo" if weighting == "token_pool" else None
    return (PhaseLoss("upstream", upstream_loss, upstream_agg_mode, w_up, "up/", pool),
            PhaseLoss("downstream", downstream_loss, downstream_agg_mode, w_down, "down/", pool))


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
    weighting: str = "fixed",
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
        weighting: "fixed" (each phase over its own counts) or "token_pool" (one token mean over both).
        kl_estimator, kl_coef, entropy_coef: as in ``policy_objective``, shared by both phases.
        up_extras, down_extras: per-phase reference log-probs, entropy and TIS weights.
    Returns:
        (scalar loss, LossMetrics with "up/..." and "down/..." keys and the total "loss").
    """
    phases = skpo_phases(upstream_loss, downstream_loss, upstream_agg_mode, downstream_agg_mode, w_up, w_down,
                         weighting)
    settings = ObjectiveSettings(params, norm_length=norm_length, kl_coef=kl_coef, kl_estimator=kl_estimator,
                                 entropy_coef=entropy_coef)
    return phased_objective(phases, {"upstream": upstream, "downstream": downstream},
                            {"upstream": up_counts, "downstream": down_counts}, settings,
                            {"upstream": up_extras or PhaseExtras(), "downstream": down_extras or PhaseExtras()})
