"""SKPO split position: the per-prompt length tracker, the t_q sampler and the upstream cut.

docs/algorithm.md §2 steps 1-2: t_q ~ Uniform[L_q / 6, L_q / 2] (integer tokens), with L_q a per-prompt
running response length (initial 1024) updated by the same KL-adaptive EMA as SPO's value tracker;
an upstream response that ends (EOS) before t_q is cut at half its own length instead.

Choices (ours):
- the length tracker observes segment length + mean downstream length (one observation per prompt
  and step; the mean over the G downstream responses), or the mean downstream length alone;
- like the value tracker, L starts at 1024 with N = 0, so the first observation replaces 1024;
- ``unseen="dataset_mean"`` (ours; the paper starts every prompt at 1024): a prompt not seen yet
  starts at the mean of every length observed so far over all prompts (1024 until the first
  observation), so that on short answers the first epoch does not cut G whole answers upstream;
- the integer range is [max(ceil(min_frac L), 1), max(floor(max_frac L), lower)];
- "fixed_alternating" (ablation) uses min_frac on even training steps and max_frac on odd ones;
- an early-EOS response is cut at max(floor(length / 2), 1) tokens.
"""
from __future__ import annotations

from typing import Hashable, Literal, Sequence, Union

import torch
from torch import Tensor

from megatron_skpo.algo.tracker import KeyedEMA, KLArg

SplitMode = Literal["uniform", "fixed_alternating"]
# L * frac is computed in float64; a product like 6 * (1/6) may land a hair off an integer.
_ROUND_TOL = 1e-9


UnseenLength = Literal["fixed", "dataset_mean"]


class LengthTracker(KeyedEMA):
    """Per-prompt running response length L_q (KL-adaptive EMA, no reward mapping).

    ``unseen``: what a prompt not observed yet reads: ``fixed`` = ``init_length``; ``dataset_mean`` =
    the mean of all observations so far (``init_length`` before the first), kept in the state.
    """

    def __init__(self, init_length: float = 1024.0, rho_min: float = 0.875, rho_max: float = 0.96,
                 d_half: float = 0.06, unseen: UnseenLength = "fixed"):
        if init_length < 1:
            raise ValueError(f"LengthTracker: init_length must be >= 1, got {init_length}")
        if unseen not in ("fixed", "dataset_mean"):
            raise ValueError(f"LengthTracker: unseen must be 'fixed' or 'dataset_mean', got {unseen!r}")
        super().__init__(float(init_length), rho_min, rho_max, d_half, init_count=0.0)
        self.unseen = unseen
        self._obs_sum, self._obs_n = 0.0, 0  # every observation so far, over all prompts

    def lengths(self, keys: Sequence[Hashable]) -> Tensor:
        """[P] float64 L_q (unseen prompts: see ``unseen``)."""
        value = self.read(keys)[0]
        if self.unseen == "dataset_mean" and self._obs_n:
            unseen = self._slots(keys, create=False) < 0
            value[unseen] = self._obs_sum / self._obs_n
        return value

    def observe(self, keys: Sequence[Hashable], obs: Tensor, kl: KLArg) -> None:
        """Observe [P] lengths (see ``length_observations``) with [P] or scalar KL D."""
        obs = torch.as_tensor(obs, dtype=torch.float64)
        if obs.numel() and float(obs.min()) < 0:
            raise ValueError(f"LengthTracker.observe: lengths must be >= 0, got min {float(obs.min())}")
        super().observe(keys, obs, kl)
        self._obs_sum += float(obs.sum())
        self._obs_n += obs.numel()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "obs_sum": torch.tensor(self._obs_sum, dtype=torch.float64),
                "obs_n": torch.tensor(self._obs_n, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # checkpoints from before the running mean existed hold none: it restarts from their prompts' values
        self._obs_sum = float(state["obs_sum"]) if "obs_sum" in state else float(self._value.sum())
        self._obs_n = int(state["obs_n"]) if "obs_n" in state else int(self._value.numel())


def length_observations(segment_lengths: Tensor, downstream_lengths: Tensor,
                        source: Literal["segment_plus_downstream", "downstream"] = "segment_plus_downstream"
                        ) -> Tensor:
    """One length observation per prompt, [P] float64.

    Args:
        segment_lengths: [P] tokens of the selected upstream segment.
        downstream_lengths: [P, G] tokens of each downstream response.
        source: "segment_plus_downstream" -> |s| + mean_G |o|; "downstream" -> mean_G |o|.
    """
    if downstream_lengths.dim() != 2 or segment_lengths.shape != downstream_lengths.shape[:1]:
        raise ValueError(f"length_observations: need segment_lengths [P] and downstream_lengths [P, G], "
                         f"got {tuple(segment_lengths.shape)} and {tuple(downstream_lengths.shape)}")
    down = downstream_lengths.to(torch.float64).mean(1)
    if source == "downstream":
        return down
    if source == "segment_plus_downstream":
        return segment_lengths.to(torch.float64) + down
    raise ValueError(f"length_observations: unknown source {source!r}")


def split_bounds(lengths: Tensor, min_frac: float, max_frac: float) -> tuple[Tensor, Tensor]:
    """([P] lower, [P] upper) long bounds: lower = max(ceil(min_frac L), 1), upper = max(floor(max_frac L), lower)."""
    if not 0 < min_frac <= max_frac:
        raise ValueError(f"split fractions need 0 < min_frac <= max_frac, got {min_frac}, {max_frac}")
    length = lengths.to(torch.float64)
    if length.numel() and float(length.min()) < 0:
        raise ValueError(f"split lengths must be >= 0, got min {float(length.min())}")
    lo = torch.ceil(length * min_frac - _ROUND_TOL).long().clamp(min=1)
    hi = torch.floor(length * max_frac + _ROUND_TOL).long()
    return lo, torch.maximum(hi, lo)


def sample_split_positions(lengths: Tensor, min_frac: float, max_frac: float,
                           generator: torch.Generator, mode: SplitMode = "uniform", step: int = 0) -> Tensor:
    """Split positions t_q, [P] long, for running lengths L_q [P].

    "uniform": t_q uniform over the integers of ``split_bounds`` (the paper, with 1/6 and 1/2).
    "fixed_alternating": every prompt gets the lower bound on even ``step`` and the upper on odd.
    """
    lo, hi = split_bounds(lengths, min_frac, max_frac)
    if mode == "fixed_alternating":
        return lo if step % 2 == 0 else hi
    if mode != "uniform":
        raise ValueError(f"sample_split_positions: unknown mode {mode!r}")
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
    span = hi - lo + 1
    return lo + torch.minimum((u * span).long(), span - 1)


def cut_upstream(response_lengths: Tensor, eos_before: Tensor, t_q: Union[int, Tensor]) -> Tensor:
    """Cut position (segment length) of each upstream response of one prompt, [G] long.

    Args:
        response_lengths: [G] tokens generated (generation stops at t_q for unfinished responses).
        eos_before: [G] bool, the response emitted EOS before reaching t_q tokens.
        t_q: the prompt's split position (>= 1).
    Returns:
        max(floor(length / 2), 1) where eos_before, else t_q.
    """
    t = int(t_q)
    lengths = response_lengths.long()
    if t < 1:
        raise ValueError(f"cut_upstream: t_q must be >= 1, got {t}")
    if lengths.shape != eos_before.shape or lengths.dim() != 1:
        raise ValueError(f"cut_upstream: response_lengths {tuple(lengths.shape)} and eos_before "
                         f"{tuple(eos_before.shape)} must be equal [G]")
    short = (~eos_before.bool()) & (lengths < t)
    if bool(short.any()):
        row = int(short.nonzero()[0])
        raise ValueError(f"cut_upstream: response {row} has {int(lengths[row])} < t_q={t} tokens "
                         "but eos_before is False")
    return torch.where(eos_before.bool(), (lengths // 2).clamp(min=1), torch.full_like(lengths, t))

