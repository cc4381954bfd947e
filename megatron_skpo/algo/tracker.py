"""SPO's KL-adaptive value tracker (Xu & Ding 2025), used by SPO and SKPO's upstream phase
(docs/algorithm.md §4), and the EMA it is built on.

Per key (a prompt id) the tracker holds a value V and an effective count N. On an observation x
made when the policy has drifted by D since it last acted on that key:

    rho = clip(2^(-max(D, 0) / D_half), rho_min, rho_max)
    N  <- rho * N + 1
    V  <- V + (x - V) / N

This is the Beta(alpha, beta) posterior of the SPO recipe written as (V, N): with alpha = V N and
beta = (1 - V) N, the update alpha <- rho alpha + x, beta <- rho beta + (1 - x) gives exactly the
lines above. The prior alpha = beta = 0.5 is V = 0.5, N = 1 (``prior="beta"``); ``N = 0`` makes the
first observation overwrite V (``prior="first_observation"``).

D (SPO's definition, :func:`policy_drift`): per prompt, the token mean of |log pi_then - log pi_now|
over the prompt's previous sampled response; the trainer measures it (``trainer/drift.py``).

``kl_adaptive_update`` is the pure, vectorised core. ``KeyedEMA`` keeps one (V, N) per key and
applies repeated keys of one batch sequentially in batch order. ``ValueTracker`` is the value
baseline in reward space [-1, 1] (tracked in [0, 1] via r' = (r + 1) / 2) with prioritised prompt
sampling; SKPO's length tracker (``megatron_skpo.skpo.split``) reuses ``KeyedEMA`` unmapped.

Deviations (ours): D is clamped at 0 (only matters for other drift estimators, which can be
negative); unseen prompts get the maximum sampling weight.
"""
from __future__ import annotations

from typing import Hashable, Literal, Sequence, Union

import torch
from torch import Tensor

Key = Union[int, str]
KLArg = Union[float, Tensor]
Prior = Literal["beta", "first_observation"]
PRIOR_COUNT = {"beta": 1.0, "first_observation": 0.0}


def forgetting_factor(d: KLArg, rho_min: float, rho_max: float, d_half: float) -> tuple[Tensor, Tensor]:
    """(rho, clipped): rho = clip(2^(-max(D, 0) / d_half), rho_min, rho_max) and whether a bound was hit.

    Args:
        d: [K] or scalar drift D. Returns two [K] (or scalar) tensors (float64, bool).
    """
    if not 0 < rho_min <= rho_max <= 1:
        raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got rho_min={rho_min}, rho_max={rho_max}")
    if d_half <= 0:
        raise ValueError(f"d_half must be > 0, got {d_half}")
    raw = torch.exp2(-torch.as_tensor(d, dtype=torch.float64).clamp(min=0.0) / d_half)
    rho = raw.clamp(rho_min, rho_max)
    return rho, (raw < rho_min) | (raw > rho_max)


def kl_adaptive_update(value: Tensor, count: Tensor, obs: Tensor, d: KLArg, rho_min: float,
                       rho_max: float, d_half: float) -> tuple[Tensor, Tensor]:
    """One KL-adaptive EMA step for a batch of distinct keys (elementwise, no state).

    Args:
        value: [K] current V. count: [K] current effective count N.
        obs: [K] observations x. d: [K] or scalar drift D per key.
    Returns:
        (value, count): [K] each, V + (x - V) / N' and N' = rho * N + 1.
    """
    rho, _ = forgetting_factor(d, rho_min, rho_max, d_half)
    rho = rho.to(device=value.device, dtype=value.dtype)
    new_count = rho * count + 1.0
    new_value = value + (obs.to(value.dtype) - value) / new_count
    return new_value, new_count


def policy_drift(logp_then: Tensor, logp_now: Tensor, mask: Tensor) -> Tensor:
    """SPO's D per row: the token mean of |log pi_then - log pi_now| over the valid tokens.

    Args:
        logp_then, logp_now: [B, T] log-probs of the same sampled tokens under the policy that
            sampled them and under the current one. mask: [B, T] 1 on the response tokens.
    Returns:
        [B] float64 (0 for a row without a valid token).
    """
    if logp_then.shape != logp_now.shape or logp_now.shape != mask.shape or logp_now.dim() != 2:
        raise ValueError(f"policy_drift: logp_then {tuple(logp_then.shape)}, logp_now {tuple(logp_now.shape)} "
                         f"and mask {tuple(mask.shape)} must be equal [B, T]")
    m = mask.to(torch.float64)
    diff = (logp_then.to(torch.float64) - logp_now.to(torch.float64)).abs() * m
    return diff.sum(1) / m.sum(1).clamp(min=1.0)


class KeyedEMA:
    """One KL-adaptive EMA (V, N) per hashable key; unseen keys read (init_value, init_count)."""

    def __init__(self, init_value: float, rho_min: float = 0.875, rho_max: float = 0.96, d_half: float = 0.06,
                 init_count: float = 0.0):
        if init_count < 0:
            raise ValueError(f"init_count must be >= 0, got {init_count}")
        self.init_value, self.rho_min, self.rho_max, self.d_half = init_value, rho_min, rho_max, d_half
        self.init_count = float(init_count)
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
                self._count = torch.cat([self._count, torch.full((len(new),), self.init_count, dtype=torch.float64)])
        return torch.tensor([self._slot.get(k, -1) for k in keys], dtype=torch.long)

    def read(self, keys: Sequence[Hashable]) -> tuple[Tensor, Tensor]:
        """([K] value, [K] count) before any update; unseen keys give (init_value, init_count)."""
        slots = self._slots(keys, create=False)
        seen = slots >= 0
        value = torch.full((len(keys),), float(self.init_value), dtype=torch.float64)
        count = torch.full((len(keys),), self.init_count, dtype=torch.float64)
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
                self.d_half)

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

    Starts at V = 0 in reward space (0.5 tracked) with the Beta(0.5, 0.5) prior's N = 1 (``prior="beta"``,
    the SPO recipe), or N = 0 so that the first observation sets V (``"first_observation"``).
    """

    def __init__(self, rho_min: float = 0.875, rho_max: float = 0.96, d_half: float = 0.06,
                 priority_floor: float = 0.05, prior: Prior = "beta"):
        if prior not in PRIOR_COUNT:
            raise ValueError(f"ValueTracker: prior must be one of {', '.join(PRIOR_COUNT)}, got {prior!r}")
        super().__init__(0.5, rho_min, rho_max, d_half, PRIOR_COUNT[prior])
        self.priority_floor = priority_floor

    def beta_params(self, keys: Sequence[Key]) -> tuple[Tensor, Tensor]:
        """([K] alpha, [K] beta) of the Beta posterior over the success probability (alpha = V N)."""
        v, n = self.read(keys)
        return v * n, (1.0 - v) * n

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
