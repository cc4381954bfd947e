"""Sign-consistency diagnostic of Monte Carlo token advantages (docs/algorithm.md §1 and §7).

For a group of G responses, the "true" advantage of response i at some position is its success
probability p_i normalised within the group: A*_i = (p_i - mean_G p) / std_G p. Dense MC estimates
p_i from K continuations, p^_i = Binomial(K, p_i) / K, and normalises the same way; GRPO instead
broadcasts the normalised outcome reward (r_i = +-1 drawn with p_i) to every token. The paper's
claim: with practical K (8..64) the signs of MC advantages are often wrong for balanced groups, and
MC's mean absolute error to A* only beats GRPO's broadcast at K in the thousands.

This module is the synthetic version: known p_i, simulated draws. ``diagnose`` returns per-K sign
accuracy, the probability that all G signs are right, and the MAE of MC and of GRPO to A*.
Both estimates use the same group normalisation (``(x - mean) / (std + eps)``, Bessel-corrected std,
a constant group -> 0) as ``megatron_skpo.algo.advantages.grpo``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def group_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """(x - mean) / (std + eps) along the last dim [..., G]; a constant group gives exactly 0."""
    centred = x - x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=True)
    constant = (x.amax(dim=-1, keepdim=True) == x.amin(dim=-1, keepdim=True))
    return torch.where(constant, torch.zeros_like(x), centred / (std + eps))


def mc_advantages(p: Tensor, k: int, trials: int, generator: torch.Generator, eps: float = 1e-6) -> Tensor:
    """[trials, G] group-normalised MC value estimates from K Bernoulli(p_i) continuations each."""
    counts = torch.binomial(torch.full((trials, p.numel()), float(k), dtype=torch.float64),
                            p.to(torch.float64).expand(trials, -1).contiguous(), generator=generator)
    return group_normalize(counts / k, eps)


def grpo_advantages(p: Tensor, trials: int, generator: torch.Generator, eps: float = 1e-6) -> Tensor:
    """[trials, G] GRPO's broadcast advantage: group-normalised outcome rewards r_i = +-1 ~ p_i."""
    wins = torch.bernoulli(p.to(torch.float64).expand(trials, -1).contiguous(), generator=generator)
    return group_normalize(2 * wins - 1, eps)


def sign_agreement(est: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """(fraction of signs right over all entries, fraction of trials with every sign right).

    est: [trials, G]; true: [G]. Entries whose true advantage is 0 are excluded (no sign to get).
    An estimate of exactly 0 counts as wrong where the truth has a sign.
    """
    valid = true != 0
    right = (torch.sign(est) == torch.sign(true)) | ~valid
    per_entry = right[:, valid].to(torch.float64).mean() if bool(valid.any()) else torch.tensor(1.0)
    return per_entry, right.all(dim=-1).to(torch.float64).mean()


@dataclass
class DiagnosticRow:
    """One K of the diagnostic; accuracies in [0, 1], errors in advantage units."""

    k: int
    sign_accuracy: float  # MC: fraction of (trial, response) signs that match A*
    all_signs_right: float  # MC: fraction of trials where all G signs match
    mc_mae: float  # MC: mean |A^ - A*|
    grpo_sign_accuracy: float  # GRPO broadcast: same metrics for reference
    grpo_mae: float


def diagnose(p: Tensor, ks: list[int], trials: int = 4000, seed: int = 0, eps: float = 1e-6) -> list[DiagnosticRow]:
    """Run the synthetic diagnostic for success probabilities p [G] at each K in ``ks``."""
    if p.dim() != 1 or p.numel() < 2:
        raise ValueError(f"diagnose: p must be [G] with G >= 2, got shape {tuple(p.shape)}")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("diagnose: success probabilities must lie in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    true = group_normalize(p.to(torch.float64), eps)
    grpo = grpo_advantages(p, trials, gen, eps)
    grpo_acc, _ = sign_agreement(grpo, true)
    grpo_mae = float((grpo - true).abs().mean())
    rows = []
    for k in ks:
        mc = mc_advantages(p, k, trials, gen, eps)
        acc, all_right = sign_agreement(mc, true)
        rows.append(DiagnosticRow(k, float(acc), float(all_right), float((mc - true).abs().mean()),
                                  float(grpo_acc), grpo_mae))
    return rows


def balanced_group(g: int = 8, spread: float = 0.1) -> Tensor:
    """A balanced group (half above, half below 0.5): p_i = 0.5 +- spread * (rank offsets)."""
    offsets = torch.linspace(-1.0, 1.0, g, dtype=torch.float64)
    return (0.5 + spread * offsets).clamp(0.0, 1.0)


# --- the same diagnostic on a real model (``skpo-analyze sign-consistency --model``) -------------
#
# There the success probabilities are unknown: the "truth" at a prefix is the success rate of
# K_truth continuations, the estimate that of K other continuations of the same prefix, and GRPO's
# reference is the group-normalised outcome of the response itself. All three are normalised over
# the G responses of a problem at the same relative position, with ``group_normalize``.


@dataclass
class SignStats:
    """Sign agreement and error of estimated against "true" group-normalised advantages."""

    entries: int  # (group, response) entries whose true advantage has a sign (is not 0)
    groups: int  # groups with at least one such entry
    sign_accuracy: float  # fraction of those entries whose estimate has the same sign (an estimate of 0 is wrong)
    all_signs_right: float  # fraction of those groups with every such entry right
    mae: float  # mean |estimate - truth| over every entry, zero-truth entries included
    all_entries: int  # every entry (the MAE's denominator)


def sign_stats(est: Tensor, truth: Tensor) -> SignStats:
    """``est``, ``truth``: [N, G] group-normalised advantages of N groups; NaN rates where undefined."""
    if est.shape != truth.shape or est.dim() != 2:
        raise ValueError(f"sign_stats: est and truth must both be [N, G], got {tuple(est.shape)}, {tuple(truth.shape)}")
    valid = truth != 0
    right = torch.sign(est) == torch.sign(truth)
    groups = valid.any(dim=1)
    nan = float("nan")
    entries, n_groups = int(valid.sum()), int(groups.sum())
    acc = float(right[valid].to(torch.float64).mean()) if entries else nan
    all_right = float((right | ~valid)[groups].all(dim=1).to(torch.float64).mean()) if n_groups else nan
    mae = float((est - truth).abs().to(torch.float64).mean()) if est.numel() else nan
    return SignStats(entries, n_groups, acc, all_right, mae, int(est.numel()))


def sign_stats_by_position(est: Tensor, truth: Tensor) -> list[SignStats]:
    """``est``, ``truth``: [N, G, M] advantages at M relative positions -> one SignStats per position."""
    if est.shape != truth.shape or est.dim() != 3:
        raise ValueError(f"sign_stats_by_position: est and truth must both be [N, G, M], got "
                         f"{tuple(est.shape)}, {tuple(truth.shape)}")
    return [sign_stats(est[:, :, m], truth[:, :, m]) for m in range(est.shape[2])]


def sign_stats_by_key(est: Tensor, truth: Tensor, key: Tensor) -> dict[int, SignStats]:
    """[N, G, M] advantages, [N] integer key per group (e.g. its correct count) -> SignStats per key
    value, over every position of the groups with that key."""
    if est.shape != truth.shape or est.dim() != 3 or key.shape != est.shape[:1]:
        raise ValueError(f"sign_stats_by_key: need est, truth [N, G, M] and key [N], got {tuple(est.shape)}, "
                         f"{tuple(truth.shape)}, {tuple(key.shape)}")
    out = {}
    for k in sorted(set(key.tolist())):
        rows = key == k
        flat = lambda x: x[rows].permute(0, 2, 1).reshape(-1, x.shape[1])  # noqa: E731 [N_k * M, G]
        out[int(k)] = sign_stats(flat(est), flat(truth))
    return out
