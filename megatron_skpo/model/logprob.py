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
The entropy term is computed only when the entropy has a gradient (an entropy bonus in the loss).

Precision: the three matmuls (logits, both gradients) run in the weights' dtype, as every other
layer's; the softmax statistics and ``dz`` are fp32, and the output-weight gradient is summed over
chunks in fp32.
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


_CPU_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, cols]`` work buffer. On CPU one buffer per name and dtype is kept and reused:
    a fresh allocation of a chunk's logits (hundreds of MB) comes from the kernel zero-filled and
    costs more than the exp over it. The buffers stay allocated (two fp32 and one in the weights'
    dtype of chunk x V/TP: 0.5 GB at 1024 x 49k in bf16), as large as the largest chunk seen.
    CUDA's caching allocator already reuses memory."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buf = _CPU_SCRATCH.get((name, dtype))
    if buf is None or buf.numel() < rows * cols:
        buf = _CPU_SCRATCH[(name, dtype)] = torch.empty(rows * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


def release_cpu_scratch() -> None:
    """Free the CPU work buffers of :func:`fused_logprob_entropy` (the next call allocates them again)."""
    _CPU_SCRATCH.clear()


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, inv_tau: float, pad_from: int) -> torch.Tensor:
    """Scaled fp32 logits ``[C, V/TP]`` of one chunk (a scratch buffer); padded columns (local
    index >= pad_from) -inf. The matmul runs in the weights' dtype, the softmax maths in fp32."""
    rows, cols = h.shape[0], w.shape[0]
    z = _scratch("logits", rows, cols, torch.float32, h.device)
    if w.dtype == torch.float32:
        torch.mm(h, w.t(), out=z)
    else:
        z.copy_(torch.mm(h, w.t(), out=_scratch("low", rows, cols, w.dtype, h.device)))
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    if pad_from < cols:
        z[:, pad_from:] = float("-inf")
    return z


def _local_target(target: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each target and whether this rank owns it."""
    local = target - start
    owned = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), owned


def _accumulate(total: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """Sum of the chunks' weight gradients, in fp32 when there is more than one chunk.

    Each chunk's ``dz^T h`` is one matmul in the weight's dtype, as every other linear layer's
    weight gradient is (the matmul accumulates in fp32 and rounds its result once); an fp32 matmul
    instead would cost about 3x on CPU, where the output layer is the largest matmul of a small
    model. The sum over chunks is kept in fp32: each chunk adds one rounding, not one per addition."""
    if total is None:
        return part
    return (total if total.dtype == torch.float32 else total.float()).add_(part)


class _FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, group, vocab_start, vocab_size, temperature,
                reduce_grad_hidden):
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) gets no gradient pass
        inv_tau, width = 1.0 / temperature, weight.shape[0]
        pad_from = max(0, min(width, vocab_size - vocab_start))
        T = hidden.shape[0]
        logp = hidden.new_empty(T, dtype=torch.float32)
        ent, lse, mean_z = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
        for s in range(0, T, chunk):
            e_ = min(s + chunk, T)
            z = _chunk_logits(hidden[s:e_], weight, inv_tau, pad_from)
            m = _all_reduce(z.amax(dim=1), group, dist.ReduceOp.MAX)
            local, owned = _local_target(target[s:e_], vocab_start, width)
            zt = torch.where(owned, z.gather(1, local[:, None])[:, 0] - m, 0.0)
            z.sub_(m[:, None])  # z - m: <= 0, padded columns stay -inf
            ex = torch.exp(z, out=_scratch("exp", e_ - s, width, torch.float32, z.device))
            if pad_from < width:
                z[:, pad_from:] = 0.0  # -inf * 0 would be nan in the entropy sum
            stats = torch.stack([ex.sum(1), zt, torch.einsum("cv,cv->c", ex, z)], dim=1)
            s_sum, zt, ez = _all_reduce(stats, group).unbind(1)
            log_s = torch.log(s_sum)
            logp[s:e_] = zt - log_s
            lse[s:e_] = m + log_s
            mean_z[s:e_] = m + ez / s_sum
            ent[s:e_] = log_s - ez / s_sum
        ctx.save_for_backward(hidden, weight, target, lse, mean_z)
        ctx.args = (chunk, group, vocab_start, pad_from, inv_tau, reduce_grad_hidden)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, target, lse, mean_z = ctx.saved_tensors
        chunk, group, vocab_start, pad_from, inv_tau, reduce_grad_hidden = ctx.args
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        with_entropy = g_ent is not None and bool(g_ent.any())
        grad_h = torch.empty_like(hidden)
        grad_w = None
        for s in range(0, hidden.shape[0], chunk):
            e_ = min(s + chunk, hidden.shape[0])
            dz = _chunk_dlogits(hidden[s:e_], weight, target[s:e_], lse[s:e_], mean_z[s:e_], g_logp[s:e_],
                                g_ent[s:e_] if with_entropy else None, vocab_start, pad_from, inv_tau)
            torch.mm(dz, weight, out=grad_h[s:e_])
            grad_w = _accumulate(grad_w, dz.t() @ hidden[s:e_])
        if grad_w is None:  # no tokens
            grad_w = torch.zeros_like(weight)
        if reduce_grad_hidden:
            _all_reduce(grad_h, group)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None, None


def _chunk_dlogits(h, weight, target, lse, mean_z, g_logp, g_ent, vocab_start, pad_from, inv_tau):
    """One chunk's gradient w.r.t. its logits ``h W^T`` (the 1/tau included), in the weight's dtype:

        dz = -p * (g_logp + g_ent * (z - E)) + g_logp * onehot(y),   p = softmax(z),

    with the logits recomputed and ``p`` from the saved log-sum-exp; the entropy term only when
    the entropy has a gradient (``g_ent`` not None). Built in scratch buffers, in place."""
    width = weight.shape[0]
    z = _chunk_logits(h, weight, inv_tau, pad_from)
    p = torch.sub(z, lse[:, None], out=_scratch("exp", z.shape[0], width, torch.float32, z.device)).exp_()
    if g_ent is None:
        dz = p.mul_(-g_logp[:, None])
    else:
        z.sub_(mean_z[:, None])
        if pad_from < width:
            z[:, pad_from:] = 0.0  # -inf * 0 would be nan
        dz = z.mul_(g_ent[:, None]).add_(g_logp[:, None]).mul_(p).neg_()
    local, owned = _local_target(target, vocab_start, width)
    rows = torch.nonzero(owned)[:, 0]
    dz[rows, local[rows]] += g_logp[rows]
    if inv_tau != 1.0:
        dz.mul_(inv_tau)
    if weight.dtype == torch.float32:
        return dz
    return _scratch("low", dz.shape[0], width, weight.dtype, dz.device).copy_(dz)


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
