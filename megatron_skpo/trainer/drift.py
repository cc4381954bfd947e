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
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_skpo.algo.tracker import policy_drift


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

    def load_state_dict(self, state: dict) -> None:
        keys, tokens, plens, logps = state["keys"], state["tokens"], state["prompt_lens"], state["logp"]
        if not (len(keys) == len(tokens) == len(plens) == len(logps)):
            raise ValueError(f"drift store: {len(keys)} keys, {len(tokens)} token lists, {len(plens)} prompt "
                             f"lengths, {len(logps)} log-prob lists")
        self._items = {}
        for k, t, p, lp in zip(keys, tokens, plens, logps):
            self.remember(k, t, int(p), lp)


def _union(local: dict, group: Any) -> dict:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    out: dict = {}
    for d in gathered:
        out.update(d)
    return out
