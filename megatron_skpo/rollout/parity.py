"""Trainer vs sampler log-prob parity on the same tokens (logged every step).

On-policy, the importance ratio pi_trainer / pi_sampler should be 1; kernels, dtypes and sampling
transforms make it drift. The metrics below show how far: the absolute log-prob difference
(mean, max) and the distribution of the per-token ratio r = exp(logp_trainer - logp_sampler)
(mean, std, quantiles, and the share of tokens outside the clip range [1 - eps_low, 1 + eps_high]
that a PPO/CISPO loss would clip even before any update). TIS uses the same ratio
(``megatron_skpo.algo.tis``).
"""
from __future__ import annotations

import torch
from torch import Tensor

QUANTILES = (0.01, 0.5, 0.99)


def logprob_parity(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor,
                   eps_low: float = 0.2, eps_high: float = 0.28, prefix: str = "parity/") -> dict[str, float]:
    """Parity metrics over the masked tokens.

    Args:
        trainer_logprobs: [N, T] log pi_trainer of each target token (e.g. at temperature tau).
        sampler_logprobs: [N, T] the sampler's log-prob of the same tokens.
        mask: [N, T] bool, tokens to compare (the response tokens).
    Returns:
        ``{prefix + name: value}`` with mean_abs_diff, max_abs_diff, mean_diff, ratio_mean,
        ratio_std, ratio_p01/p50/p99, clip_frac and tokens. Empty masks give ``tokens = 0`` only.
    """
    if not trainer_logprobs.shape == sampler_logprobs.shape == mask.shape:
        raise ValueError(f"logprob_parity: shapes differ: trainer {tuple(trainer_logprobs.shape)}, "
                         f"sampler {tuple(sampler_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    diff = (trainer_logprobs.double() - sampler_logprobs.double())[m]
    out = {f"{prefix}tokens": float(diff.numel())}
    if diff.numel() == 0:
        return out
    ratio = diff.exp()
    out.update({
        f"{prefix}mean_abs_diff": float(diff.abs().mean()),
        f"{prefix}max_abs_diff": float(diff.abs().max()),
        f"{prefix}mean_diff": float(diff.mean()),
        f"{prefix}ratio_mean": float(ratio.mean()),
        f"{prefix}ratio_std": float(ratio.std(unbiased=False)),
        f"{prefix}clip_frac": float(((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).double().mean()),
    })
    qs = torch.quantile(ratio, torch.tensor(QUANTILES, dtype=torch.float64))
    out.update({f"{prefix}ratio_p{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs)})
    return out
