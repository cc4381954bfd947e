"""Truncated importance sampling (TIS) for the sampler-vs-trainer log-prob mismatch.

The rollout engine (vLLM) and the trainer (Megatron) compute slightly different probabilities for the
same tokens (kernels, precision, batch shapes). The losses' ratio r = pi_theta / pi_old uses the
trainer's recomputed ``old_log_probs``; TIS corrects for the tokens having actually been drawn from
the sampler's distribution by weighting each token's loss with

    w_t = min(pi_old_trainer(y_t) / pi_sampler(y_t), C),

a constant (detached) weight, truncated at C to bound the variance (Yao et al., "Your efficient RL
framework secretly brings you off-policy RL training", 2025). Off by default: the caller decides
whether to pass ``tis_weights`` to ``policy_objective``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def tis_weights(
    old_log_probs: Tensor, sampler_log_probs: Tensor, cap: float, mask: Optional[Tensor] = None
) -> Tensor:
    """Per-token TIS weights ``min(exp(old_log_probs - sampler_log_probs), cap)``, detached.

    Args:
        old_log_probs: [B, T] the trainer's log-probs of the sampled tokens under the sampling weights.
        sampler_log_probs: [B, T] the rollout engine's log-probs of the same tokens.
        cap: C > 0, the truncation.
        mask: optional [B, T]; positions outside it get weight 1 (neutral).
    Returns:
        [B, T] weights in (0, cap], no gradient.
    """
    if old_log_probs.shape != sampler_log_probs.shape:
        raise ValueError(
            f"old_log_probs {tuple(old_log_probs.shape)} and sampler_log_probs "
            f"{tuple(sampler_log_probs.shape)} differ"
        )
    if not cap > 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    with torch.no_grad():
        # min(exp(x), C) == exp(min(x, log C)): never overflows however large the mismatch.
        w = torch.exp((old_log_probs - sampler_log_probs).clamp(max=math.log(cap)))
        if mask is not None:
            w = torch.where(mask.bool(), w, torch.ones((), dtype=w.dtype, device=w.device))
    return w


def apply_tis(per_token_loss: Tensor, weights: Tensor) -> Tensor:
    """Weight a per-token loss [B, T] by TIS weights [B, T] (the weights carry no gradient)."""
    if per_token_loss.shape != weights.shape:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and weights {tuple(weights.shape)} differ")
    return per_token_loss * weights.detach()


def tis_truncated(weights: Tensor, cap: float) -> Tensor:
    """[B, T] float indicator of tokens whose weight was truncated at ``cap`` (for metrics)."""
    return (weights >= cap * (1 - 1e-6)).to(weights.dtype)
