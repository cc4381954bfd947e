"""SPO's KL-adaptive EMA tracker (Xu & Ding 2025, used by SKPO's upstream phase; docs/algorithm.md §4).

Per key (a prompt id) the tracker holds a value V and an effective count N. On an observation x
made when the policy has moved by D (a KL estimate) since it last acted on that key:

    rho = clip(2^(-max(D, 0) / tau_half), rho_min, rho_max)
    N  <- rho * N + 1
    V  <- V + (x - V) / N          (equivalently eta = 1 / (rho * N_prev + 1))

``kl_adaptive_update`` is the pure, vectorised core. ``KeyedEMA`` keeps one (V, N) per key and
applies repeated keys of one batch sequentially in batch order. ``ValueTracker`` is SPO's value
baseline in reward space [-1, 1] (tracked in [0, 1] via r' = (r + 1) / 2) with prioritised prompt
sampling; SKPO's length tracker (``megatron_skpo.skpo.split``) reuses ``KeyedEMA`` unmapped.

Deviations (ours): D is clamped at 0 (a k1 estimate can be negative); unseen prompts get the
maximum sampling weight; ``policy_kl`` falls back to the batch-mean KL for rows without a group.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence, Union

import torch
from torch import Tensor

Key = Union[int, str]
KLArg = Union[float, Tensor]


def kl_adaptive_update(value: Tensor, count: Tensor, obs: Tensor, kl: KLArg, rho_min: float,
                       rho_max: float, tau_half: float) -> tuple[Tensor, Tensor]:
    """One KL-adaptive EMA step for a batch of distinct keys (elementwise, no state).

    Args:
        value: [K] current V. count: [K] current effective count N (0 = never observed).
        obs: [K] observations x. kl: [K] or scalar KL estimate D per key.
    Returns:
        (value, count): [K] each, V + (x - V) / N' and N' = rho * N + 1.

    D is clamped at 0 first: a sampled-token KL estimate can be negative, and 2^(-D/tau) > 1 would
    then overflow for large |D|; since rho_max <= 1 the clipped rho is the same either way.
    """
    if not 0 < rho_min <= rho_max <= 1:
        raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got rho_min={rho_min}, rho_max={rho_max}")
    if tau_half <= 0:
        raise ValueError(f"tau_half must be > 0, got {tau_half}")
    d = torch.as_tensor(kl, dtype=value.dtype, device=value.device).clamp(min=0.0)
    rho = torch.exp2(-d / tau_half).clamp(rho_min, rho_max)
    new_count = rho * count + 1.0
    new_value = value + (obs.to(value.dtype) - value) / new_count
    return new_value, new_count


def policy_kl(logp_now: Tensor, logp_then: Tensor, mask: Tensor,
              group_index: Optional[Tensor] = None) -> Tensor:
    """Per-row estimate of D = KL(pi_now || pi_then): mean over sampled tokens of logp_now - logp_then.

    Args:
        logp_now, logp_then: [B, T] log-probs of the sampled tokens. mask: [B, T] 1 on sampled tokens.
        group_index: [B] long prompt id per row; the token mean is taken over all rows of a group.
            None (ours: per-prompt log-probs unavailable) -> the batch-mean KL for every row.
    Returns:
        [B] float. An unbiased (k1) estimate when tokens come from pi_now; it can be negative for
        one prompt. Groups without a valid token also get the batch mean.
    """
    if logp_now.shape != logp_then.shape or logp_now.shape != mask.shape or logp_now.dim() != 2:
        raise ValueError(f"policy_kl: logp_now {tuple(logp_now.shape)}, logp_then "
                         f"{tuple(logp_then.shape)} and mask {tuple(mask.shape)} must be equal [B, T]")
    m = mask.to(logp_now.dtype)
    diff = (logp_now - logp_then) * m
    batch_mean = diff.sum() / m.sum().clamp(min=1.0)
    if group_index is None:
        return batch_mean.expand(logp_now.shape[0]).clone()
    _, inv = torch.unique(group_index, return_inverse=True)
    num = diff.new_zeros(int(inv.max()) + 1).index_add_(0, inv, diff.sum(1))
    den = torch.zeros_like(num).index_add_(0, inv, m.sum(1))
    per_group = torch.where(den > 0, num / den.clamp(min=1.0), batch_mean)
    return per_group[inv]


class KeyedEMA:
    """One KL-adaptive EMA (V, N) per hashable key; unseen keys read (init_value, 0)."""

    def __init__(self, init_value: float, rho_min: float = 0.875, rho_max: float = 0.96,
                 tau_half: float = 8.0):
        self.init_value, self.rho_min, self.rho_max, self.tau_half = init_value, rho_min, rho_max, tau_half
        self._slot: dict[Hashable, int] = {}
        self._value = torch.zeros(0, dtype=torch.float64)
        self._count = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot

    def _slots(self, keys: Sequence[Hashable], create: bool) -> Tensor:
        """[K] slot per key; -1 for unseen keys unless ``create`` appends them."""
        if create:
            new = [k for k in dict.fromkeys(keys) if k not in self._slot]
            for k in new:
                self._slot[k] = len(self._slot)
            if new:
                self._value = torch.cat([self._value, torch.full((len(new),), float(self.init_value),
                                                                  dtype=torch.float64)])
                self._count = torch.cat([self._count, torch.zeros(len(new), dtype=torch.float64)])
        return torch.tensor([self._slot.get(k, -1) for k in keys], dtype=torch.long)

    def read(self, keys: Sequence[Hashable]) -> tuple[Tensor, Tensor]:
        """([K] value, [K] count) before any update; unseen keys give (init_value, 0)."""
        slots = self._slots(keys, create=False)
        seen = slots >= 0
        value = torch.full((len(keys),), float(self.init_value), dtype=torch.float64)
        count = torch.zeros(len(keys), dtype=torch.float64)
        value[seen], count[seen] = self._value[slots[seen]], self._count[slots[seen]]
        return value, count

    def observe(self, keys: Sequence[Hashable], obs: Tensor, kl: KLArg) -> None:
        """Update with [K] observations (and [K] or scalar KL).

        A key repeated within the batch is applied sequentially in batch order: the j-th occurrence
        of every key is applied in round j, each round vectorised over distinct keys.
        """
        obs = torch.as_tensor(obs, dtype=torch.float64).reshape(-1)
        kl_t = torch.as_tensor(kl, dtype=torch.float64).reshape(-1).expand(len(keys))
        if obs.numel() != len(keys):
            raise ValueError(f"observe: {obs.numel()} observations for {len(keys)} keys")
        slots = self._slots(keys, create=True)
        occurrences: dict[Hashable, int] = {}
        rounds_list = []
        for k in keys:
            rounds_list.append(occurrences.get(k, 0))
            occurrences[k] = rounds_list[-1] + 1
        rounds = torch.tensor(rounds_list, dtype=torch.long)
        for r in range(int(rounds.max()) + 1 if len(keys) else 0):
            sel = rounds == r
            s = slots[sel]
            self._value[s], self._count[s] = kl_adaptive_update(
                self._value[s], self._count[s], obs[sel], kl_t[sel], self.rho_min, self.rho_max,
                self.tau_half)

    def state_dict(self) -> dict:
        """Plain keys list and float64 tensors; loads under torch.load(weights_only=True)."""
        keys = sorted(self._slot, key=self._slot.__getitem__)
        return {"keys": keys, "value": self._value.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict) -> None:
        keys, value, count = list(state["keys"]), state["value"], state["count"]
        if not (len(keys) == value.numel() == count.numel()):
            raise ValueError(f"tracker state: {len(keys)} keys but value has {value.numel()} and "
                             f"count {count.numel()} entries")
        self._slot = {k: i for i, k in enumerate(keys)}
        self._value = value.to(torch.float64).clone()
        self._count = count.to(torch.float64).clone()


class ValueTracker(KeyedEMA):
    """SPO's per-prompt value V(q) for rewards in [-1, 1], tracked in [0, 1] as r' = (r + 1) / 2.

    Starts at V = 0 in reward space (0.5 tracked) with N = 0, so the first observation sets V.
    """

    def __init__(self, rho_min: float = 0.875, rho_max: float = 0.96, tau_half: float = 8.0,
                 priority_floor: float = 0.05):
        super().__init__(0.5, rho_min, rho_max, tau_half)
        self.priority_floor = priority_floor

    def success_prob(self, keys: Sequence[Key]) -> Tensor:
        """[K] tracked v(q) in [0, 1] (0.5 for unseen keys)."""
        return self.read(keys)[0]

    def value(self, keys: Sequence[Key]) -> Tensor:
        """[K] V(q) = 2 v(q) - 1 in reward space: the pre-update baseline (0 for unseen keys)."""
        return 2.0 * self.success_prob(keys) - 1.0

    def counts(self, keys: Sequence[Key]) -> Tensor:
        """[K] effective counts N(q) (0 for unseen keys)."""
        return self.read(keys)[1]

    def observe(self, keys: Sequence[Key], rewards: Tensor, kl: KLArg) -> None:
        """Observe [K] rewards in [-1, 1] (mapped to [0, 1]) with [K] or scalar KL D."""
        r = torch.as_tensor(rewards, dtype=torch.float64)
        if r.numel() and (r.min() < -1 or r.max() > 1):
            raise ValueError(f"ValueTracker.observe: rewards must lie in [-1, 1], got "
                             f"[{float(r.min())}, {float(r.max())}]")
        super().observe(keys, (r + 1.0) / 2.0, kl)

    def weights(self, keys: Sequence[Key]) -> Tensor:
        """[K] prioritised sampling weight sqrt(v (1 - v)) + floor; unseen -> sqrt(0.25) + floor."""
        v = self.success_prob(keys)
        return torch.sqrt((v * (1.0 - v)).clamp(min=0.0)) + self.priority_floor

    def sample_prompts(self, candidate_keys: Sequence[Key], n: int,
                       generator: torch.Generator) -> list[Key]:
        """Draw n distinct keys, without replacement, with probability proportional to ``weights``."""
        if not 0 <= n <= len(candidate_keys):
            raise ValueError(f"sample_prompts: n={n} but only {len(candidate_keys)} candidates")
        if n == 0:
            return []
        w = self.weights(candidate_keys)
        if float(w.sum()) <= 0:  # floor 0 and every prompt solved or failed: sample uniformly
            w = torch.ones_like(w)
        idx = torch.multinomial(w, n, replacement=False, generator=generator)
        return [candidate_keys[i] for i in idx.tolist()]
