"""Fused vocab-parallel log-prob and entropy of sampled tokens, without materialising the logits.

For final hidden states ``h [T, H]`` and this TP rank's output-layer shard ``W_r [V/TP, H]``
(the embedding shard when embeddings are tied), with sampler temperature ``tau``:

    z = h W^T / tau          (vocab-parallel: rank r holds the columns [r V/TP, (r+1) V/TP))
    log pi(y_t) = z_{t,y_t} - logsumexp_v z_{t,v}
    H_t = logsumexp_v z_{t,v} - sum_v softmax(z_t)_v z_{t,v}

Tokens are processed ``chunk`` at a time. Per chunk, the max, the sum of exponentials, the
target logit and ``sum e^(z-m) (z-m)`` are all-reduced over the TP group (max once, the rest in
one packed all-reduce), exactly as Megatron's ``_VocabParallelCrossEntropy`` does for the loss.
Only per-token statistics ``[T]`` are kept for backward, which recomputes each chunk's logits:
extra memory is O(chunk x V/TP) instead of O(T x V/TP). Columns at or beyond ``vocab_size`` (the
padding Megatron adds to divide the vocab by TP) are masked to -inf. The returned gradient w.r.t.
``h`` is already summed over the TP group (the hidden states are replicated across it), so the
caller passes the plain last-stage hidden states.

Gradients (per token, ``p = softmax(z)``, ``E = sum_v p_v z_v``):
    d log pi / d z_v = 1[v = y] - p_v,     d H / d z_v = -p_v (z_v - E).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_reduce(t: torch.Tensor, group: Optional[ProcessGroup], op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, inv_tau: float, pad_from: int) -> torch.Tensor:
    """Scaled fp32 logits ``[C, V/TP]`` of one chunk; padded columns (local index >= pad_from) -inf."""
    z = (h @ w.t()).float().mul_(inv_tau)
    if pad_from < z.shape[1]:
        z[:, pad_from:] = float("-inf")
    return z


def _local_target(target: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each target and whether this rank owns it."""
    local = target - start
    owned = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), owned


class _FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, group, vocab_start, vocab_size, temperature,
                reduce_grad_hidden):
        inv_tau, width = 1.0 / temperature, weight.shape[0]
        pad_from = max(0, min(width, vocab_size - vocab_start))
        T = hidden.shape[0]
        logp = hidden.new_empty(T, dtype=torch.float32)
        ent, lse, mean_z = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
        for s in range(0, T, chunk):
            e_ = min(s + chunk, T)
            z = _chunk_logits(hidden[s:e_], weight, inv_tau, pad_from)
            m = _all_reduce(z.max(dim=1).values, group, dist.ReduceOp.MAX)
            local, owned = _local_target(target[s:e_], vocab_start, width)
            zt = torch.where(owned, z.gather(1, local[:, None])[:, 0] - m, 0.0)
            z.sub_(m[:, None])  # z - m: <= 0, padded columns stay -inf
            ex = torch.exp(z)
            z.nan_to_num_(neginf=0.0)  # -inf * 0 would be nan in the entropy sum
            stats = torch.stack([ex.sum(1), zt, torch.einsum("cv,cv->c", ex, z)], dim=1)
            s_sum, zt, ez = _all_reduce(stats, group).unbind(1)
            log_s = torch.log(s_sum)
            logp[s:e_] = zt - log_s
            lse[s:e_] = m + log_s
            mean_z[s:e_] = m + ez / s_sum
            ent[s:e_] = log_s - ez / s_sum
            del z, ex
        ctx.save_for_backward(hidden, weight, target, lse, mean_z)
        ctx.args = (chunk, group, vocab_start, pad_from, inv_tau, reduce_grad_hidden)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, target, lse, mean_z = ctx.saved_tensors
        chunk, group, vocab_start, pad_from, inv_tau, reduce_grad_hidden = ctx.args
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], chunk):
            e_ = min(s + chunk, hidden.shape[0])
            z = _chunk_logits(hidden[s:e_], weight, inv_tau, pad_from)
            p = (z - lse[s:e_, None]).exp_()
            # dz = -p * (g_logp + g_ent * (z - E)) + g_logp * onehot(y), built in place in z
            z.sub_(mean_z[s:e_, None]).nan_to_num_(neginf=0.0)
            z.mul_(g_ent[s:e_, None]).add_(g_logp[s:e_, None]).mul_(p).neg_()
            local, owned = _local_target(target[s:e_], vocab_start, weight.shape[0])
            rows = torch.nonzero(owned)[:, 0]
            z[rows, local[rows]] += g_logp[s:e_][rows]
            z.mul_(inv_tau)
            grad_h[s:e_] = z.to(weight.dtype) @ weight
            grad_w.addmm_(z.t(), hidden[s:e_].float())  # fp32 accumulation also for bf16 inputs
            del z, p
        if reduce_grad_hidden:
            _all_reduce(grad_h, group)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None, None


def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                          group: Optional[ProcessGroup] = None, vocab_start: int = 0,
                          vocab_size: Optional[int] = None, temperature: float = 1.0,
                          chunk: int = 1024, reduce_grad_hidden: bool = True,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``target`` and entropy under ``softmax(h W^T / temperature)``, vocab-parallel.

    Args:
        hidden: ``[T, H]`` final hidden states (after the final norm), replicated over ``group``.
        weight: ``[V/TP, H]`` this rank's output-layer (or tied embedding) shard.
        target: ``[T]`` global token ids.
        group: the tensor-parallel process group (``None`` = no TP).
        vocab_start: first global vocab id of this rank's shard (``rank * V/TP``).
        vocab_size: the true vocabulary size; columns at or beyond it are padding, masked out.
        temperature: the sampler's temperature (``> 0``).
        chunk: tokens per chunk; memory is O(chunk x V/TP).
        reduce_grad_hidden: all-reduce the gradient of ``hidden`` over ``group`` (the hidden
            states are replicated over TP). False when the caller's own op does it, e.g. the
            sequence-parallel all-gather whose backward reduce-scatters.

    Returns:
        ``(logp [T], entropy [T])`` in fp32, identical on every rank of ``group``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V/TP, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target must be [T]={tuple(hidden.shape[:1])}, got {tuple(target.shape)}")
    if temperature <= 0 or chunk <= 0:
        raise ValueError(f"temperature ({temperature}) and chunk ({chunk}) must be > 0")
    tp = dist.get_world_size(group) if group is not None else 1
    vocab_size = weight.shape[0] * tp if vocab_size is None else vocab_size
    return _FusedLogProb.apply(hidden, weight, target.long(), chunk, group, vocab_start,
                               vocab_size, float(temperature), reduce_grad_hidden)


def naive_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                          vocab_size: Optional[int] = None, temperature: float = 1.0,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (TP=1): full fp32 logits ``[T, V]``, ``log_softmax``, gather; and the entropy."""
    logits = (hidden @ weight.t()).float() / temperature
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, target.long()[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
