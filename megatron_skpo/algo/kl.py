"""KL estimators (Schulman's k1/k2/k3) and the entropy-bonus term.

Each estimator takes per-token log-probs of the sampled tokens under the policy that sampled them
(``log_probs``, p) and under a reference (``ref_log_probs``, q), both [B, T], and returns a
per-token estimate of KL(p || q) whose expectation under samples from p is (k1, k3) or
approximates (k2, to second order) the exact KL:
- k1 = log p - log q (unbiased, high variance, can be negative);
- k2 = 0.5 * (log p - log q)^2 (biased, low variance, >= 0);
- k3 = q/p - log(q/p) - 1 (unbiased, low variance, >= 0).
As a penalty, the gradient flows through ``log_probs`` (the current policy); the reference is a
constant. Log-ratios in k3 are clamped to [-20, 20] so that exp never overflows to inf.

Used two ways: the KL penalty to a reference policy (``kl_coef`` in ``policy_objective``), and the
"approx KL to old" monitoring statistic of the losses (p = old policy, q = current policy).
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_skpo.algo.registries import KL_ESTIMATORS

_LOG_RATIO_CLAMP = 20.0


def _check(log_probs: Tensor, ref_log_probs: Tensor) -> None:
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and ref_log_probs {tuple(ref_log_probs.shape)} differ")


@KL_ESTIMATORS.register("k1")
def kl_k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k1 = log p - log q, per token. Shapes: [B, T] -> [B, T]."""
    _check(log_probs, ref_log_probs)
    return log_probs - ref_log_probs


@KL_ESTIMATORS.register("k2")
def kl_k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k2 = 0.5 * (log p - log q)^2, per token. Shapes: [B, T] -> [B, T]."""
    _check(log_probs, ref_log_probs)
    return 0.5 * (log_probs - ref_log_probs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3 = exp(log q - log p) - (log q - log p) - 1 >= 0, per token. Shapes: [B, T] -> [B, T]."""
    _check(log_probs, ref_log_probs)
    d = (ref_log_probs - log_probs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    # expm1(d) - d is exact near d = 0, where exp(d) - d - 1 cancels catastrophically.
    return torch.expm1(d) - d


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Reference per-position entropy H = -sum_v p_v log p_v (tests; the model has a fused kernel).

    Args:
        logits: [..., V]. Returns: [...].
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def entropy_bonus(entropy: Tensor, coef: float) -> Tensor:
    """The per-token term an entropy bonus adds to a loss that is MINIMISED: ``-coef * H``.

    Args:
        entropy: [B, T] per-token entropy of the current policy (carries the gradient).
    """
    return -coef * entropy
