"""SPO's per-prompt policy drift D for the value tracker (docs/algorithm.md §4).

D(q) = token mean of |log pi_then - log pi_now| over the tokens of q's *previous* sampled
response: ``log pi_then`` is the trainer's log-prob of those tokens at the step they were sampled
(the old-policy log-probs; ours: not the sampler's, so the vLLM/Megatron numerical mismatch does
not enter D), ``log pi_now`` the current policy's, from one forward pass over the stored
responses of the step's revisited prompts. A prompt seen for the first time has D = 0.

Which response is stored is the method's ``drift_phase``: the first row of that phase per prompt
(SPO: its response; SKPO: the kept segment; the GRPO family: the group's first response).

Data parallelism: each rank stores the responses of the prompts it trained; ``measure`` computes
D for the keys it holds and all-gathers the values over the data-parallel group, so every rank
feeds its trackers the same D. ``forward_logprobs`` is collective over the model-parallel group,
whose ranks hold the same store.

Checkpoints: each rank saves its store (``rank_<r>.pt``). A resume at the same layout loads its
own. At another layout (world size, TP, PP or EP changed) every rank reads every saved rank's
entries and keeps those whose prompt's home is its data-parallel rank (:meth:`DriftStore.merge_states`:
a stable hash of the key modulo the data-parallel size). Nothing is lost: ``measure`` needs some
data-parallel rank to hold a prompt, and the ranks of one model-parallel group (same data-parallel
rank) keep the same entries, as ``forward_logprobs`` needs. The saved stores never disagree on a
prompt: ranks of one model-parallel group hold identical copies, and a prompt's next training step
moves it to the rank that trains it (``stages.remember`` forgets it on the others).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Hashable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_skpo.algo.tracker import policy_drift

log = logging.getLogger(__name__)


class DriftStore:
    """Per prompt key: (prompt + response token ids, prompt length, [R] log pi_then)."""

    def __init__(self) -> None:
        self._items: dict[Hashable, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def remember(self, key: Hashable, tokens: Sequence[int] | torch.Tensor, prompt_len: int,
                 logp_then: torch.Tensor) -> None:
        """Keep ``tokens`` (prompt + response) and the response's log-probs as ``key``'s previous response."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if logp_then.numel() != len(tokens) - prompt_len or prompt_len < 1:
            raise ValueError(f"DriftStore.remember({key!r}): {logp_then.numel()} log-probs for "
                             f"{len(tokens) - prompt_len} response tokens (prompt {prompt_len} of {len(tokens)})")
        self._items[key] = (tokens.clone(), int(prompt_len), logp_then.detach().float().clone())

    def forget(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self._items.pop(k, None)

    def measure(self, policy, keys: Sequence[Hashable], budget: int, dp_group: Any = None) -> dict[Hashable, float]:
        """D of every key some data-parallel rank holds (collective over the data-parallel group)."""
        from megatron_skpo.model.packing import pack_sequences, unpack
        from megatron_skpo.model.train_step import forward_logprobs

        mine = [k for k in dict.fromkeys(keys) if k in self._items and len(self._items[k][0]) > self._items[k][1]]
        local: dict[Hashable, float] = {}
        if mine:
            tokens = [self._items[k][0] for k in mine]
            masks = [torch.arange(len(t)) >= self._items[k][1] for k, t in zip(mine, tokens)]
            micro = pack_sequences(tokens, masks, budget)
            now: list[Optional[torch.Tensor]] = [None] * len(mine)
            for mb, (logp, _) in zip(micro, forward_logprobs(policy, micro)):
                now = [n if n is not None else u for n, u in zip(now, unpack(logp, mb, len(mine)))]
            for k, lp in zip(mine, now):
                _, p, then = self._items[k]
                local[k] = float(policy_drift(then[None], lp[p:][None], torch.ones(1, len(then)))[0])
        return _union(local, dp_group)

    def state_dict(self) -> dict:
        keys = list(self._items)
        items = [self._items[k] for k in keys]
        return {"keys": keys, "tokens": [t for t, _, _ in items], "prompt_lens": [p for _, p, _ in items],
                "logp": [lp for _, _, lp in items]}

    @staticmethod
    def merge_states(states: list[dict], dp_rank: int = 0, dp_size: int = 1) -> dict:
        """The entries of ``states`` (saved by every rank of another layout) whose prompt's home
        (:func:`home_rank`) is ``dp_rank`` of ``dp_size`` data-parallel ranks. A prompt saved by
        several ranks keeps the lowest rank's copy (a differing copy is logged: it should not exist)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"drift store: data-parallel rank {dp_rank} of {dp_size}")
        merged: dict = {"keys": [], "tokens": [], "prompt_lens": [], "logp": []}
        seen: dict = {}
        differing = 0
        for state in states:
            for k, t, p, lp in zip(state["keys"], state["tokens"], state["prompt_lens"], state["logp"], strict=True):
                if k in seen:
                    t0, p0, lp0 = seen[k]
                    differing += not (p0 == p and torch.equal(t0, t) and torch.equal(lp0, lp))
                    continue
                seen[k] = (t, p, lp)
                if home_rank(k, dp_size) != dp_rank:
                    continue
                for name, v in zip(("keys", "tokens", "prompt_lens", "logp"), (k, t, p, lp)):
                    merged[name].append(v)
        if differing:
            log.warning("drift store: %d prompt(s) saved by several ranks with different responses; "
                        "kept the lowest rank's", differing)
        return merged

    def load_state_dict(self, state: dict) -> None:
        keys, tokens, plens, logps = state["keys"], state["tokens"], state["prompt_lens"], state["logp"]
        if not (len(keys) == len(tokens) == len(plens) == len(logps)):
            raise ValueError(f"drift store: {len(keys)} keys, {len(tokens)} token lists, {len(plens)} prompt "
                             f"lengths, {len(logps)} log-prob lists")
        self._items = {}
        for k, t, p, lp in zip(keys, tokens, plens, logps):
            self.remember(k, t, int(p), lp)


def home_rank(key: Hashable, dp_size: int) -> int:
    """The data-parallel rank that holds ``key`` after a resharded resume: the same in every process
    (sha256 of its repr: Python's ``hash`` of a string differs between processes)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") % dp_size


def _union(local: dict, group: Any) -> dict:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    out: dict = {}
    for d in gathered:
        out.update(d)
    return out
