"""Token-level policy-gradient losses under one typed signature, and their composition.

Sign convention: every function returns a loss to MINIMISE, i.e. the NEGATIVE of the paper's
objective J. Per-token losses are zero outside the mask; aggregation (``algo.aggregation``) turns
them into this rank's share of the global mean.

Registered in ``POLICY_LOSSES`` as ``fn(inp: PolicyLossInput, params: PolicyLossParams) ->
(per_token_loss [B, T], stats)`` with ``reads``, the ``PolicyLossParams`` fields the loss uses (a
test checks the declaration against the function), with r_t = exp(log pi_theta - log pi_old) per token:
- ``ppo_clip``: -min(r A, clip(r, 1-eps_low, 1+eps_high) A) (PPO with DAPO's clip-higher), and for
  A < 0 the optional dual clip bounds the loss by -c A (Ye et al. 2020): min(max(-rA, -clip(r)A), -cA).
  SKPO's upstream loss J_I.
- ``cispo``: -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi_theta: the gradient flows only through
  log pi_theta, so clipped tokens still contribute (scaled). SKPO's downstream loss J_II uses both
  bounds as the SKPO paper states; MiniMax-M1's CISPO clipped only from above (eps_low = 1 recovers it).
- ``gspo``: the sequence ratio s_i = exp(mean_t (log pi_theta - log pi_old)) over sequence i's valid
  tokens, in the token form s_it = sg(s_i) exp(log pi_theta - sg(log pi_theta)) (equal to s_i in
  value, gradient s_i * grad log pi_theta(y_it)), then PPO's clipped min with GSPO's tight bounds.
  Dual clip is not applied (GSPO has none).
- ``sapo``: SAPO (Gao et al. 2025, arXiv 2511.20347): the clip replaced by a soft gate,
  -(4 / tau) sigmoid(tau (r - 1)) A with tau = sapo_tau_pos where A > 0 and sapo_tau_neg elsewhere.
  Its gradient is 4 sigmoid(tau (r - 1)) (1 - sigmoid(tau (r - 1))) r A grad log pi_theta: exactly
  A grad log pi_theta on-policy (r = 1), smoothly smaller as r leaves 1, never cut to zero. No clip
  flags (nothing is clipped); ``gate`` is the gradient weight 4 sigma (1 - sigma) per token.
- ``reinforce``: -A log pi_theta (on-policy REINFORCE; no ratio).
- ``unclipped``: -r A (the importance-weighted policy gradient without a clip; Critique-GRPO's
  initial responses).
- ``shaped_prob``: -A f(pi_theta) with f(p) = p / (p + gamma), p = pi_theta(y_t) itself, not a ratio
  (Critique-GRPO's policy shaping of refinements, which another context sampled: gamma =
  ``critique_shaping_gamma``, 0.1). Its gradient A gamma p / (p + gamma)^2 grad log pi_theta lifts
  the weight of tokens the policy finds unlikely.
``stats`` holds detached per-token [B, T] float tensors: ``clip_low``/``clip_high`` (1 where that
clip bound is active), ``dual_clip``, ``ratio`` and the approx KL to the old policy ``kl_old_k1`` /
``kl_old_k3`` (samples come from pi_old: p = old, q = current).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_skpo.algo.aggregation import Count, aggregate, count_seqs, count_tokens, masked_sum
from megatron_skpo.algo.kl import entropy_bonus, kl_k1, kl_k3
from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.algo.registries import KL_ESTIMATORS, POLICY_LOSSES
from megatron_skpo.algo.tis import apply_tis
from megatron_skpo.settings import setting

Stats = dict[str, Tensor]
PolicyLossFn = Callable[["PolicyLossInput", "PolicyLossParams"], tuple[Tensor, Stats]]
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: the ratio stays finite, clipping handles the rest


@dataclass
class PolicyLossInput:
    """What every policy loss consumes; all [B, T] on one device."""

    log_probs: Tensor  # [B, T] current policy log pi_theta(y_t), requires grad
    old_log_probs: Tensor  # [B, T] log pi_old(y_t) of the sampling policy, recomputed by the trainer
    advantages: Tensor  # [B, T] per-token advantages (sequence advantages broadcast by the caller)
    mask: Tensor  # [B, T] 0/1 or bool: tokens that carry loss

    def __post_init__(self):
        shape = self.log_probs.shape
        if len(shape) != 2:
            raise ValueError(f"PolicyLossInput.log_probs must be [B, T], got {tuple(shape)}")
        for name in ("old_log_probs", "advantages", "mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"PolicyLossInput.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"log_probs has {tuple(shape)}"
                )


@dataclass(frozen=True)
class PolicyLossParams:
    """Plain-number knobs of the losses. Each field declares its key under ``cfg.algo`` and the
    trainer builds this from the config by those keys (``settings.from_config``); each loss declares
    the fields it reads when it registers (``POLICY_LOSSES.meta(name)["reads"]``), which is what
    ``config/algorithms.py`` rejects for the losses that ignore them."""

    eps_low: float = setting(0.2, "clip.eps_low")  # ratio >= 1 - eps_low
    eps_high: float = setting(0.28, "clip.eps_high")  # ratio <= 1 + eps_high (clip-higher)
    dual_clip_c: Optional[float] = setting(None, "clip.dual_clip_c")  # ppo_clip: loss <= -c A for A < 0; None = off
    gspo_eps_low: float = setting(3e-4, "gspo_eps_low")  # gspo's sequence-ratio bounds
    gspo_eps_high: float = setting(4e-4, "gspo_eps_high")
    sapo_tau_pos: float = setting(1.0, "sapo_tau_pos")  # sapo's gate temperature where A > 0
    sapo_tau_neg: float = setting(1.05, "sapo_tau_neg")  # ... and where A <= 0 (steeper: damps faster)
    shaping_gamma: float = setting(0.1, "critique.shaping_gamma")  # shaped_prob's f(p) = p / (p + gamma)

    def __post_init__(self):
        for name in ("sapo_tau_pos", "sapo_tau_neg", "shaping_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PolicyLossParams.{name} must be > 0, got {getattr(self, name)}")
        for name in ("eps_low", "gspo_eps_low"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PolicyLossParams.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("eps_high", "gspo_eps_high"):
            if getattr(self, name) < 0:
                raise ValueError(f"PolicyLossParams.{name} must be >= 0, got {getattr(self, name)}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"PolicyLossParams.dual_clip_c must be > 1 or None, got {self.dual_clip_c}")


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _advantages(inp: PolicyLossInput) -> Tensor:
    """Advantages zeroed outside the mask: a NaN in padding would otherwise turn the zero upstream
    gradient of the masked positions into NaN (0 * NaN) in the backward pass."""
    return _zero_outside(inp.advantages, inp.mask)


def _ratio_stats(log_ratio: Tensor, ratio: Tensor, low: Tensor, high: Tensor, dual: Tensor) -> Stats:
    """Detached per-token statistics shared by the losses (log_ratio = log pi_theta - log pi_old)."""
    lr = log_ratio.detach()
    # KL(old || current) from tokens sampled by old: p = old, q = current; only log q - log p = lr
    # enters the estimators, so log p is set to 0.
    zero = torch.zeros_like(lr)
    kl_old = {"kl_old_k1": kl_k1(zero, lr), "kl_old_k3": kl_k3(zero, lr)}
    flags = {"clip_low": low, "clip_high": high, "dual_clip": dual}
    out = {k: v.detach().to(log_ratio.dtype) for k, v in flags.items()}
    return {**out, "ratio": ratio.detach(), **kl_old}


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, lo: float, hi: float, dual_c: Optional[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PPO's pessimistic surrogate as a loss, with the flags of the active bounds."""
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(lo, hi)
    loss = torch.maximum(unclipped, clipped)
    low, high = (ratio < lo) & (adv < 0), (ratio > hi) & (adv > 0)  # where the clip changes the loss
    dual = torch.zeros_like(low)
    if dual_c is not None:
        bound = -adv * dual_c
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    return loss, low, high, dual


@POLICY_LOSSES.register("ppo_clip", reads=("eps_low", "eps_high", "dual_clip_c"))
def ppo_clip_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """PPO-clip with clip-higher and optional dual clip; [B, T] loss (SKPO's J_I integrand, negated)."""
    log_ratio = (inp.log_probs - inp.old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    loss, low, high, dual = _clipped_surrogate(
        ratio, _advantages(inp), 1 - params.eps_low, 1 + params.eps_high, params.dual_clip_c
    )
    return _zero_outside(loss, inp.mask), _ratio_stats(log_ratio, ratio, low, high, dual)


@POLICY_LOSSES.register("cispo", reads=("eps_low", "eps_high"))
def cispo_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """CISPO: -sg(clip(r, 1-eps_low, 1+eps_high)) * A * log pi_theta; [B, T] (SKPO's J_II integrand)."""
    log_ratio = (inp.log_probs - inp.old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    lo, hi = 1 - params.eps_low, 1 + params.eps_high
    weight = ratio.clamp(lo, hi).detach()
    loss = -weight * _advantages(inp) * inp.log_probs
    low, high = ratio < lo, ratio > hi  # the weight is clipped whatever the sign of A
    return _zero_outside(loss, inp.mask), _ratio_stats(log_ratio, ratio, low, high, torch.zeros_like(low))


@POLICY_LOSSES.register("gspo", reads=("gspo_eps_low", "gspo_eps_high"))
def gspo_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """GSPO: PPO's clipped min on the length-normalised sequence ratio (token form); [B, T]."""
    m = inp.mask.bool()
    seq_len = m.sum(dim=-1, keepdim=True).clamp_min(1)
    seq_log_ratio = masked_sum(inp.log_probs - inp.old_log_probs, m, dim=-1).unsqueeze(-1) / seq_len
    token_log_ratio = seq_log_ratio.detach() + inp.log_probs - inp.log_probs.detach()  # value = seq ratio
    token_log_ratio = token_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(token_log_ratio)
    loss, low, high, dual = _clipped_surrogate(
        ratio, _advantages(inp), 1 - params.gspo_eps_low, 1 + params.gspo_eps_high, None
    )
    return _zero_outside(loss, m), _ratio_stats(token_log_ratio, ratio, low, high, dual)


@POLICY_LOSSES.register("sapo", reads=("sapo_tau_pos", "sapo_tau_neg"))
def sapo_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """SAPO: -(4 / tau) sigmoid(tau (r - 1)) A with the temperature chosen by the sign of A; [B, T]."""
    log_ratio = (inp.log_probs - inp.old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = _advantages(inp)
    tau = torch.where(adv > 0, params.sapo_tau_pos, params.sapo_tau_neg).to(ratio.dtype)
    sig = torch.sigmoid(tau * (ratio - 1))
    loss = -(4 / tau) * sig * adv
    no = torch.zeros_like(inp.mask, dtype=torch.bool)
    stats = _ratio_stats(log_ratio, ratio, no, no, no)
    stats["gate"] = (4 * sig * (1 - sig)).detach()
    return _zero_outside(loss, inp.mask), stats


@POLICY_LOSSES.register("reinforce", reads=())
def reinforce_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """REINFORCE: -A * log pi_theta; [B, T]. Ratio stats are reported for monitoring only."""
    log_ratio = (inp.log_probs - inp.old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    no = torch.zeros_like(inp.mask, dtype=torch.bool)
    loss = -_advantages(inp) * inp.log_probs
    return _zero_outside(loss, inp.mask), _ratio_stats(log_ratio, torch.exp(log_ratio), no, no, no)


@POLICY_LOSSES.register("unclipped", reads=())
def unclipped_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """-r A, r = pi_theta / pi_old, nothing clipped; [B, T]."""
    log_ratio = (inp.log_probs - inp.old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    no = torch.zeros_like(inp.mask, dtype=torch.bool)
    return _zero_outside(-ratio * _advantages(inp), inp.mask), _ratio_stats(log_ratio, ratio, no, no, no)


@POLICY_LOSSES.register("shaped_prob", reads=("shaping_gamma",))
def shaped_prob_loss(inp: PolicyLossInput, params: PolicyLossParams) -> tuple[Tensor, Stats]:
    """-A p / (p + gamma) with p = pi_theta(y_t); [B, T]. ``old_log_probs`` only feed the ratio statistics."""
    p = torch.exp(inp.log_probs.clamp(max=0.0))
    loss = -_advantages(inp) * p / (p + params.shaping_gamma)
    log_ratio = (inp.log_probs - inp.old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    no = torch.zeros_like(inp.mask, dtype=torch.bool)
    stats = _ratio_stats(log_ratio, torch.exp(log_ratio), no, no, no)
    stats["prob"] = p.detach()
    return _zero_outside(loss, inp.mask), stats


def policy_objective(
    inp: PolicyLossInput,
    params: PolicyLossParams,
    loss_name: str,
    agg_mode: str,
    global_tokens: Count,
    global_seqs: Count,
    *,
    ref_log_probs: Optional[Tensor] = None,
    kl_estimator: str = "k3",
    kl_coef: float = 0.0,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
    tis_weights: Optional[Tensor] = None,
    norm_length: Optional[float] = None,
) -> tuple[Tensor, LossMetrics]:
    """This rank's share of the aggregated loss: per token pg * w_tis + kl_coef * KL - entropy_coef * H.

    Args:
        inp: the [B, T] tensors of the batch; params: clip bounds.
        loss_name: a ``POLICY_LOSSES`` name; agg_mode: an ``aggregation.AGG_MODES`` mode.
        global_tokens, global_seqs: valid tokens / sequences over all ranks and micro-batches.
        ref_log_probs: [B, T] reference log-probs (needed iff kl_coef > 0); kl_estimator: its name.
        entropy: [B, T] per-token entropy of the current policy (needed iff entropy_coef > 0).
        tis_weights: [B, T] detached TIS weights (``tis.tis_weights``) or None for off.
    Returns:
        (scalar loss to minimise, LossMetrics with token means of every statistic and the total
        ``loss`` / ``pg_loss`` contributions).
    """
    per_token_pg, stats = POLICY_LOSSES.get(loss_name)(inp, params)
    mask = inp.mask
    pg = per_token_pg if tis_weights is None else apply_tis(per_token_pg, tis_weights)
    total = pg
    if tis_weights is not None:
        stats["tis_weight"] = tis_weights.detach()
    if kl_coef != 0.0:
        if ref_log_probs is None:
            raise ValueError("policy_objective: kl_coef != 0 needs ref_log_probs")
        kl = KL_ESTIMATORS.get(kl_estimator)(inp.log_probs, ref_log_probs)
        total = total + kl_coef * kl
        stats["kl_ref"] = kl.detach()
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("policy_objective: entropy_coef != 0 needs entropy")
        total = total + entropy_bonus(entropy, entropy_coef)
    if entropy is not None:
        stats["entropy"] = entropy.detach()
    agg = (agg_mode, global_tokens, global_seqs, norm_length)
    loss = aggregate(total, mask, *agg)
    return loss, _objective_metrics(stats, pg.detach(), mask, loss.detach(), aggregate(pg.detach(), mask, *agg))


def _objective_metrics(stats: Stats, pg: Tensor, mask: Tensor, loss: Tensor, pg_loss: Tensor) -> LossMetrics:
    """Token means of every per-token statistic, plus this rank's additive loss contributions."""
    metrics = LossMetrics()
    n_tok = count_tokens(mask)
    for name, value in {**stats, "pg_token_loss": pg}.items():
        metrics.add(name, masked_sum(value.to(torch.float64), mask), n_tok)
    metrics.add_total("tokens", n_tok)
    metrics.add_total("seqs", count_seqs(mask))
    metrics.add_total("loss", loss)
    metrics.add_total("pg_loss", pg_loss)
    return metrics
