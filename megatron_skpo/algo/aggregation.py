"""Loss aggregation: one function for every mode, returning this rank's share of the global mean.

The denominators (valid tokens, valid sequences) are GLOBAL counts over the whole mini-batch on all
data-parallel ranks and micro-batches; the trainer computes and sums them. The numerator is local.
So summing ``aggregate`` over micro-batches and ranks (which gradient accumulation and the DDP
all-reduce of gradients do) gives exactly the global mean, whatever the data split. This is the
torchtitan/verl ``agg_loss`` idea with the global count passed in instead of read from a global
parallel state.

Modes (B sequences, T positions, m the 0/1 mask, x the per-token loss):
- ``token-mean``: sum_{i,t} m x / global_tokens (DAPO; SKPO's J_II).
- ``seq-mean-token-mean``: sum_i (sum_t m x / sum_t m) / global_seqs (GRPO; SKPO's J_I).
- ``seq-mean-token-sum``: sum_i sum_t m x / global_seqs.
- ``seq-mean-token-sum-norm``: sum_{i,t} m x / (global_seqs * norm_length) (Dr.GRPO's constant
  length normaliser).
A sequence with no valid token contributes 0 and is not counted by ``count_seqs``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

Count = Union[int, float, Tensor]


def count_tokens(mask: Tensor) -> Tensor:
    """Number of valid tokens in ``mask`` [B, T] (a 0-d int64 tensor; sum it over ranks)."""
    return mask.bool().sum()


def count_seqs(mask: Tensor) -> Tensor:
    """Number of sequences in ``mask`` [B, T] with at least one valid token (0-d int64)."""
    return mask.bool().any(dim=-1).sum()


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set; positions outside the mask never leak NaN/inf in."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _denominator(count: Count, name: str, like: Tensor) -> Tensor:
    """``max(count, 1)`` as a tensor: an all-empty global batch then gives 0, not NaN."""
    if not isinstance(count, Tensor) and count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp_min(1)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    global_tokens: Count,
    global_seqs: Count,
    norm_length: Optional[float] = None,
) -> Tensor:
    """Aggregate a per-token loss into this rank's scalar contribution to the global mean.

    Args:
        per_token: [B, T] per-token loss (any values outside ``mask`` are ignored).
        mask: [B, T] 0/1 (or bool) valid-token mask.
        mode: one of ``AGG_MODES``.
        global_tokens: valid tokens over all ranks/micro-batches (used by ``token-mean``).
        global_seqs: valid sequences over all ranks/micro-batches (the ``seq-mean-*`` modes).
        norm_length: the constant length of ``seq-mean-token-sum-norm`` (required there only).
    Returns:
        [] scalar; the sum of these over ranks is the global aggregate.
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    if mode == "token-mean":
        return masked_sum(per_token, mask) / _denominator(global_tokens, "global_tokens", per_token)
    if mode == "seq-mean-token-mean":
        seq_len = mask.bool().sum(dim=-1).clamp_min(1).to(per_token.dtype)
        seq_means = masked_sum(per_token, mask, dim=-1) / seq_len
        return seq_means.sum() / _denominator(global_seqs, "global_seqs", per_token)
    if mode == "seq-mean-token-sum":
        return masked_sum(per_token, mask) / _denominator(global_seqs, "global_seqs", per_token)
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError(f"mode 'seq-mean-token-sum-norm' needs norm_length > 0, got {norm_length}")
        denom = _denominator(global_seqs, "global_seqs", per_token) * norm_length
        return masked_sum(per_token, mask) / denom
    raise ValueError(f"unknown loss aggregation mode {mode!r}; allowed: {', '.join(AGG_MODES)}")
