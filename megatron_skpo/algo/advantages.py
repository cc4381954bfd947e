"""Advantage estimators: one typed signature, registered by name in ``ADVANTAGES``.

Every estimator is ``fn(inp: AdvantageInput, params: AdvantageParams) -> Tensor [B, T]`` (token-level
advantages, zero outside ``response_mask``), registered with ``reads``, the ``AdvantageParams`` fields
it uses (a test checks the declaration against the function); callers use ``compute_advantages(name, inp, params)``,
which also applies the optional batch normalisation (SKPO appendix C) to any estimator.

Registered: grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, spo, dense_mc, prime.
Group statistics are vectorised with ``index_add_`` over group ids (ids need not be contiguous).
A group of size 1 or with equal rewards gives exactly 0 (checked with max == min, not float noise).

Choices (ours): ``batch_norm_level`` picks token- or sequence-level batch statistics (default token);
REINFORCE++ always whitens over tokens and SPO over sequences; dense_mc's "group_norm" compares
responses at the same *relative* position (first and last tokens aligned), so every token of every
response has a counterpart in each peer; the optional ``value_starts`` marks VinePPO steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import torch
from torch import Tensor

from megatron_skpo.algo.registries import ADVANTAGES
from megatron_skpo.settings import setting

NormLevel = Literal["token", "sequence"]


@dataclass
class AdvantageInput:
    """What every estimator sees (B rows = responses, T = padded response length)."""

    rewards: Tensor  # [B] float outcome rewards
    group_index: Tensor  # [B] long; responses of one prompt share an id (any order, any values)
    response_mask: Tensor  # [B, T] 1 on response tokens (bool, int or float)
    baseline: Optional[Tensor] = None  # [B] external baseline, e.g. the SPO tracker's V_prev(q)
    # [B, T] Monte Carlo value of the state *before* token t: V(q, o_<t) (token 0 -> V(q)),
    # piecewise-constant between estimation positions; the value after the last token is the reward.
    token_values: Optional[Tensor] = None
    value_starts: Optional[Tensor] = None  # [B, T] bool (ours): where a fresh MC estimate starts (vine)
    process_rewards: Optional[Tensor] = None  # [B, T] per-token process rewards r_t (PRIME's implicit PRM)

    def __post_init__(self):
        if self.rewards.dim() != 1 or not self.rewards.is_floating_point() or self.rewards.numel() == 0:
            raise ValueError(f"AdvantageInput.rewards must be a non-empty float [B] tensor, got "
                             f"{self.rewards.dtype} {tuple(self.rewards.shape)}")
        b = self.rewards.shape[0]
        if self.group_index.shape != (b,) or self.group_index.is_floating_point():
            raise ValueError(f"AdvantageInput.group_index must be an integer [{b}] tensor, got "
                             f"{self.group_index.dtype} {tuple(self.group_index.shape)}")
        if self.response_mask.dim() != 2 or self.response_mask.shape[0] != b:
            raise ValueError(f"AdvantageInput.response_mask must be [{b}, T], got "
                             f"{tuple(self.response_mask.shape)}")
        shape = tuple(self.response_mask.shape)
        for name, want in (("baseline", (b,)), ("token_values", shape), ("value_starts", shape),
                           ("process_rewards", shape)):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"AdvantageInput.{name} must be {list(want)}, got {tuple(t.shape)}")

    @property
    def mask(self) -> Tensor:
        """[B, T] response mask as the rewards' float dtype."""
        return self.response_mask.to(self.rewards.dtype)


@dataclass(frozen=True)
class AdvantageParams:
    """Plain numbers for the estimators. Each field declares its key under ``cfg.algo`` (the method
    builds this by those keys, ``settings.from_config``); each estimator declares the fields it reads
    when it registers (``ADVANTAGES.meta(name)["reads"]``), and ``compute_advantages`` reads
    ``BATCH_NORM_READS`` when ``batch_norm`` is on."""

    eps: float = setting(1e-6, "adv_eps")  # in (x - mean) / (std + eps)
    std_unbiased: bool = setting(True, "std_unbiased")  # Bessel's correction in every std (torch.std default)
    batch_norm: bool = setting(False, "batch_norm_advantages")  # also normalise over the batch (appendix C)
    batch_norm_level: NormLevel = setting("token", "batch_norm_level")  # over valid tokens or over sequences
    dense_mode: Literal["group_norm", "vine"] = setting("group_norm", "dense_mc.mode")
    process_coef: float = setting(5.0, "prime.process_coef")  # PRIME: weight of the process-reward RLOO
    outcome_coef: float = setting(5.0, "prime.outcome_coef")  # PRIME: weight of the outcome-reward RLOO
    process_norm: Literal["batch_norm", "none"] = setting("batch_norm", "prime.process_norm")

    def __post_init__(self):
        if self.eps < 0:
            raise ValueError(f"AdvantageParams.eps must be >= 0, got {self.eps}")
        if self.batch_norm_level not in ("token", "sequence"):
            raise ValueError(f"AdvantageParams.batch_norm_level: {self.batch_norm_level!r} not in token/sequence")
        if self.dense_mode not in ("group_norm", "vine"):
            raise ValueError(f"AdvantageParams.dense_mode: {self.dense_mode!r} not in group_norm/vine")
        if self.process_norm not in ("batch_norm", "none"):
            raise ValueError(f"AdvantageParams.process_norm: {self.process_norm!r} not in batch_norm/none")


class GroupStats(NamedTuple):
    """Per-row statistics of the row's group, each [B]."""

    mean: Tensor
    std: Tensor  # 0 for groups of size 1
    count: Tensor
    constant: Tensor  # bool: every value of the group is equal (size-1 groups included)


def group_stats(x: Tensor, group_index: Tensor, unbiased: bool = True) -> GroupStats:
    """Mean, std, size and constancy of x [B] within groups given by group_index [B]."""
    _, inv = torch.unique(group_index, return_inverse=True)
    g = int(inv.max()) + 1
    zeros = x.new_zeros(g)
    count = zeros.index_add(0, inv, torch.ones_like(x))
    mean = zeros.index_add(0, inv, x) / count
    sq = zeros.index_add(0, inv, (x - mean[inv]) ** 2)
    std = (sq / (count - 1.0 if unbiased else count).clamp(min=1.0)).sqrt()
    std = torch.where(count > 1, std, zeros)
    hi = x.new_full((g,), -torch.inf).scatter_reduce(0, inv, x, "amax")
    lo = x.new_full((g,), torch.inf).scatter_reduce(0, inv, x, "amin")
    return GroupStats(mean[inv], std[inv], count[inv], (hi == lo)[inv])


def whiten(x: Tensor, eps: float, unbiased: bool = True) -> Tensor:
    """(x - mean) / (std + eps) over all of x [N]; N <= 1 or equal values give exactly 0."""
    if x.numel() <= 1 or bool(x.max() == x.min()):
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std(unbiased=unbiased) + eps)


def batch_normalize(adv: Tensor, mask: Tensor, level: NormLevel, eps: float, unbiased: bool = True) -> Tensor:
    """Normalise token advantages adv [B, T] over the batch; zero outside mask [B, T].

    level "token": mean/std over every valid token (longer responses weigh more; REINFORCE++'s
    whitening). level "sequence": mean/std over the per-sequence token-mean advantages of rows with
    a valid token (each response weighs one), then (A_t - mean) / (std + eps) on every token.
    """
    m = mask.to(adv.dtype)
    valid = m > 0
    if level == "token":
        out = torch.zeros_like(adv)
        out[valid] = whiten(adv[valid], eps, unbiased)
        return out
    rows = valid.any(1)
    seq = (adv * m).sum(1)[rows] / m.sum(1)[rows]
    if seq.numel() <= 1 or bool(seq.max() == seq.min()):
        return torch.zeros_like(adv)
    return (adv - seq.mean()) / (seq.std(unbiased=unbiased) + eps) * m


def _broadcast(seq_adv: Tensor, inp: AdvantageInput) -> Tensor:
    return seq_adv[:, None] * inp.mask


@ADVANTAGES.register("grpo", reads=("eps", "std_unbiased"))
def grpo(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps), broadcast to the response tokens."""
    st = group_stats(inp.rewards, inp.group_index, params.std_unbiased)
    adv = (inp.rewards - st.mean) / (st.std + params.eps)
    return _broadcast(torch.where(st.constant, 0.0, adv), inp)


@ADVANTAGES.register("dr_grpo", reads=())
def dr_grpo(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """Dr. GRPO: A_i = R_i - mean_G R (no std division)."""
    st = group_stats(inp.rewards, inp.group_index, params.std_unbiased)
    return _broadcast(torch.where(st.constant, 0.0, inp.rewards - st.mean), inp)


@ADVANTAGES.register("rloo", reads=())
def rloo(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """RLOO: A_i = R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean_G R); size-1 groups give 0."""
    st = group_stats(inp.rewards, inp.group_index, params.std_unbiased)
    adv = st.count / (st.count - 1.0).clamp(min=1.0) * (inp.rewards - st.mean)
    return _broadcast(torch.where(st.constant, 0.0, adv), inp)


@ADVANTAGES.register("reinforce_pp", reads=("eps", "std_unbiased"))
def reinforce_pp(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """REINFORCE++ (gamma = 1, no KL reward): R broadcast to tokens, whitened over all valid tokens."""
    return batch_normalize(_broadcast(inp.rewards, inp), inp.mask, "token", params.eps, params.std_unbiased)


@ADVANTAGES.register("reinforce_pp_baseline", reads=("eps", "std_unbiased"))
def reinforce_pp_baseline(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """REINFORCE++-baseline: (R_i - mean_G R) broadcast, then whitened over all valid tokens."""
    return batch_normalize(dr_grpo(inp, params), inp.mask, "token", params.eps, params.std_unbiased)


@ADVANTAGES.register("spo", reads=("eps", "std_unbiased"))
def spo(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """SPO: A_i = R_i - V_prev(q_i) (``baseline``), whitened over the batch's sequences."""
    if inp.baseline is None:
        raise ValueError("advantage 'spo' needs AdvantageInput.baseline (the tracker's pre-update value)")
    adv = _broadcast(inp.rewards - inp.baseline.to(inp.rewards.dtype), inp)
    return batch_normalize(adv, inp.mask, "sequence", params.eps, params.std_unbiased)


def _compact(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Left-align the valid entries of x [B, T]: (xc [B, Tc], lengths [B], pos [B, T] column in xc)."""
    lengths = valid.sum(1)
    pos = valid.long().cumsum(1) - 1
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(valid)
    xc = x.new_zeros(x.shape[0], max(int(lengths.max()), 1))
    xc[rows[valid], pos[valid]] = x[valid]
    return xc, lengths, pos


def _values_after(vc: Tensor, lengths: Tensor, rewards: Tensor) -> Tensor:
    """[B, Tc] V after token k: V_{k+1}, and the outcome reward after the last token."""
    shifted = torch.cat([vc[:, 1:], vc.new_zeros(vc.shape[0], 1)], 1)
    k = torch.arange(vc.shape[1], device=vc.device)[None, :]
    return torch.where(k == (lengths[:, None] - 1), rewards[:, None], shifted)


def _vine(vc: Tensor, after: Tensor, lengths: Tensor, starts: Optional[Tensor]) -> Tensor:
    """VinePPO: A = V(next step start) - V(step start) on every token of a step, [B, Tc]."""
    k = torch.arange(vc.shape[1], device=vc.device)[None, :]
    d = torch.where(k < lengths[:, None], after - vc, 0.0)  # A_t = V_{t+1} - V_t, telescopes
    if starts is None:
        return d
    starts = starts.clone()
    starts[:, 0] = True  # the first response token always opens a step
    step = starts.long().cumsum(1) - 1 + torch.arange(vc.shape[0], device=vc.device)[:, None] * vc.shape[1]
    step_sum = d.new_zeros(d.numel()).index_add_(0, step.reshape(-1), d.reshape(-1))
    return torch.where(k < lengths[:, None], step_sum[step], 0.0)


def _group_peers(group_index: Tensor) -> Tensor:
    """[B, Gmax] row ids of every row's group members (-1 pads smaller groups)."""
    _, inv = torch.unique(group_index, return_inverse=True)
    counts = torch.bincount(inv)
    order = torch.argsort(inv, stable=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inv)
    rows = torch.arange(inv.numel(), device=inv.device)
    rank[order] = rows - first[inv[order]]
    table = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=inv.device)
    table[inv, rank] = rows
    return table[inv]


def _relative_group_norm(after: Tensor, lengths: Tensor, group_index: Tensor, eps: float,
                         unbiased: bool) -> Tensor:
    """Normalise after-values within the group at matching *relative* positions, [B, Tc].

    Token k of response i (L_i tokens) is compared with token floor(k (L_j - 1) / (L_i - 1)) of each
    response j of its group (first and last tokens align; L_i = 1 maps to j's last token). Rows
    without response tokens take no part. Memory is B * Gmax * Tc.
    """
    peers = _group_peers(group_index)
    ok = (peers >= 0) & (lengths[peers.clamp(min=0)] > 0)
    pc = peers.clamp(min=0)
    li, lj = lengths[:, None, None], lengths[pc][:, :, None]
    k = torch.arange(after.shape[1], device=after.device)[None, None, :]
    idx = torch.where(li == 1, lj - 1, (k * (lj - 1)) // (li - 1).clamp(min=1))
    vals = after[pc[:, :, None], idx.clamp(min=0, max=after.shape[1] - 1)]  # [B, Gmax, Tc]
    w = ok[:, :, None].to(after.dtype)
    n = w.sum(1)
    mean = (vals * w).sum(1) / n.clamp(min=1.0)
    var = (((vals - mean[:, None]) ** 2) * w).sum(1) / (n - 1.0 if unbiased else n).clamp(min=1.0)
    hi = vals.masked_fill(w == 0, -torch.inf).amax(1)
    lo = vals.masked_fill(w == 0, torch.inf).amin(1)
    adv = (after - mean) / (var.sqrt() + eps)
    return torch.where(hi == lo, 0.0, adv)


@ADVANTAGES.register("dense_mc", reads=("eps", "std_unbiased", "dense_mode"))
def dense_mc(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """Token-level Monte Carlo advantages from ``token_values`` (V(q, o_<t), see AdvantageInput).

    mode "group_norm" (the paper's diagnostic): the value after token t, V_{t+1} (the outcome R after
    the last token), is normalised within the group, (V - mean_G) / (std_G + eps), comparing responses
    at the same relative position (``_relative_group_norm``); at the last token this is GRPO exactly.
    mode "vine" (VinePPO): A_t = V_{t+1} - V_t; with ``value_starts`` every token of a step gets the
    step's V(next start) - V(start) (the sum of A_t over the step).
    """
    if inp.token_values is None:
        raise ValueError("advantage 'dense_mc' needs AdvantageInput.token_values")
    valid = inp.mask > 0
    vc, lengths, pos = _compact(inp.token_values.to(inp.rewards.dtype), valid)
    after = _values_after(vc, lengths, inp.rewards)
    if params.dense_mode == "vine":
        starts = None if inp.value_starts is None else _compact(inp.value_starts.bool(), valid)[0]
        adv_c = _vine(vc, after, lengths, starts)
    else:
        adv_c = _relative_group_norm(after, lengths, inp.group_index, params.eps, params.std_unbiased)
    out = torch.zeros_like(inp.mask)
    rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(valid)
    out[valid] = adv_c[rows[valid], pos[valid]]
    return out


def process_batch_norm(r: Tensor, mask: Tensor) -> Tensor:
    """PRIME's ``batch_norm`` of process rewards: r / (max over the batch of |sum_{s >= t} r_s| + 1e-6),
    which keeps the rewards' relative sizes and bounds every return-to-go by 1."""
    togo = (r * mask).flip(1).cumsum(1).flip(1)
    return r / (togo.abs().max() + 1e-6)


def leave_one_out(x: Tensor, group_index: Tensor) -> Tensor:
    """[B] mean of x over each row's group *without* the row itself (0 for a group of one)."""
    st = group_stats(x, group_index)
    return torch.where(st.count > 1, (st.mean * st.count - x) / (st.count - 1.0).clamp(min=1.0), 0.0)


@ADVANTAGES.register("prime", reads=("eps", "std_unbiased", "process_coef", "outcome_coef", "process_norm"))
def prime(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """PRIME (Cui et al. 2025, eq. 5): leave-one-out on each reward source, returns, whitened.

    With K responses per prompt, process rewards r_t (``process_rewards``, first ``batch_norm``-ed:
    :func:`process_batch_norm`) and outcome rewards R (``rewards``)::

        A_t^i = c_p sum_{s >= t} [ r_s^i - mean_{j != i} rbar^j ] + c_o [ R^i - mean_{j != i} R^j ]

    where rbar^j is the mean process reward over response j's tokens (the paper's leave-one-out
    baseline of averaged process rewards), then whitened over every valid token of the batch. The
    outcome sits on the last token, so its return is the same on every token of the response.
    (verl's PRIME recipe scales r_t by K / (K - 1) before subtracting sum_j rbar^j / (K - 1); per
    response the two agree on the sum of the process terms, not token by token.)
    """
    if inp.process_rewards is None:
        raise ValueError("advantage 'prime' needs AdvantageInput.process_rewards (the implicit PRM's r_t)")
    m = inp.mask
    r = inp.process_rewards.to(m.dtype) * m
    if params.process_norm == "batch_norm":
        r = process_batch_norm(r, m)
    mean_r = r.sum(1) / m.sum(1).clamp(min=1.0)
    process = (r - leave_one_out(mean_r, inp.group_index)[:, None]) * m
    returns = process.flip(1).cumsum(1).flip(1)
    outcome = inp.rewards - leave_one_out(inp.rewards, inp.group_index)
    adv = (params.process_coef * returns + params.outcome_coef * outcome[:, None]) * m
    return batch_normalize(adv, m, "token", params.eps, params.std_unbiased)


BATCH_NORM_READS = ("eps", "std_unbiased", "batch_norm_level")  # what compute_advantages reads when batch_norm


def compute_advantages(name: str, inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """[B, T] advantages of the registered estimator ``name``, batch-normalised if params.batch_norm."""
    fn: Callable[[AdvantageInput, AdvantageParams], Tensor] = ADVANTAGES.get(name)
    adv = fn(inp, params)
    if params.batch_norm:
        adv = batch_normalize(adv, inp.mask, params.batch_norm_level, params.eps, params.std_unbiased)
    return adv
