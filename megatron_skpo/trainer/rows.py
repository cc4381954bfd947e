"""From a graded rollout batch to packed training micro-batches, mini-batch by mini-batch.

A trained row is a sample of phase single, upstream, downstream or refine (``mc`` rows are only graded):
its tokens are prompt + response, its loss mask covers the response tokens (minus DAPO's overlong
filter: a response that hit the token cap, finish reason ``length``, carries no loss), and its
per-token values (token-aligned: entry t belongs to token t) are the advantage and the sampler's
log-prob. Rows of groups dropped by dynamic sampling are left out.

PPO mini-batches are formed over *prompts* (``train.mini_batch_prompts``, the paper's 4 updates of
32 prompts per step): all rows of a prompt (SKPO: its segment and its G downstream rows) land in the
same mini-batch, in prompt order; with several data-parallel ranks, prompt i of a mini-batch goes
to rank i mod DP. Each mini-batch is packed into micro-batches of ``parallel.micro_batch_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_skpo.model.packing import PackedBatch, pack_sequences
from megatron_skpo.rollout.types import RolloutBatch

TRAINED_PHASES = ("single", "upstream", "downstream", "refine")


@dataclass
class TrainRows:
    """The rows of one mini-batch on this rank, in packing order."""

    tokens: list[Tensor]  # [L_i] long, prompt + response
    loss_masks: list[Tensor]  # [L_i] float, 1 on trained response tokens
    values: dict[str, list[Tensor]]  # name -> [L_i] float token-aligned values ("adv", "sampler_logp")
    phases: list[str]  # [n] phase of each row
    rows: list[int]  # [n] row index in the rollout batch
    prompt_lens: list[int]  # [n] prompt tokens of each row

    def counts(self, phase: str) -> tuple[int, int]:
        """(loss tokens, sequences with a loss token) of ``phase`` in these rows."""
        masks = [m for m, p in zip(self.loss_masks, self.phases) if p == phase]
        return int(sum(float(m.sum()) for m in masks)), sum(int(bool(m.any())) for m in masks)


def train_row(batch: RolloutBatch, row: int, adv: Tensor, overlong_filter: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(tokens, loss mask, advantages, sampler log-probs), each [L] and token-aligned."""
    s = batch.samples[row]
    p, r = len(s.prompt_ids), len(s.response_ids)
    tokens = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
    keep = 0.0 if overlong_filter and s.finish_reason == "length" else 1.0
    mask = torch.cat([torch.zeros(p), torch.full((r,), keep)])
    adv = torch.cat([torch.zeros(p), adv.float()])
    logp = torch.cat([torch.zeros(p), torch.tensor(s.logprobs, dtype=torch.float32)])
    return tokens, mask, adv, logp


def mini_batches(batch: RolloutBatch, advantages: dict[int, Tensor], dropped: set[int], num_prompts: int,
                 prompts_per_mini_batch: int, dp_rank: int, dp_size: int, overlong_filter: bool,
                 policy_version: int = -1) -> list[TrainRows]:
    """This rank's rows of every mini-batch (prompt indices are the rows' ``group``). With
    ``policy_version`` (the trainer's optimizer steps so far), a mini-batch holding rows of an older
    version also gets the token values ``stale`` (the row's staleness on its response tokens), which
    select the off-policy correction in the loss; without such rows it is the synchronous input."""
    by_prompt: dict[int, list[int]] = {}
    for i, s in enumerate(batch.samples):
        if s.phase in TRAINED_PHASES and i not in dropped:
            by_prompt.setdefault(s.group, []).append(i)
    out = []
    for start in range(0, num_prompts, prompts_per_mini_batch):
        mine = [q for k, q in enumerate(range(start, start + prompts_per_mini_batch)) if k % dp_size == dp_rank]
        rows = [r for q in mine for r in by_prompt.get(q, [])]
        built = [train_row(batch, r, advantages[r], overlong_filter) for r in rows]
        values = {"adv": [b[2] for b in built], "sampler_logp": [b[3] for b in built]}
        lag = [max(policy_version - batch.samples[r].version, 0) if policy_version >= 0 else 0 for r in rows]
        if any(lag):
            values["stale"] = [torch.where(b[1] > 0, float(d), 0.0) if d else torch.zeros_like(b[1])
                               for b, d in zip(built, lag)]
        out.append(TrainRows([b[0] for b in built], [b[1] for b in built], values,
                             [batch.samples[r].phase for r in rows], rows,
                             [len(batch.samples[r].prompt_ids) for r in rows]))
    return out


def pack(rows: TrainRows, budget: int, share_prompts: bool = False) -> list[PackedBatch]:
    """Micro-batches of at most ``budget`` tokens (``PackedBatch.seq_index`` indexes ``rows``); with
    ``share_prompts`` rows with the same prompt share its trunk (``model/packing.py``)."""
    if not rows.tokens:
        return []
    return pack_sequences(rows.tokens, rows.loss_masks, budget, token_values=rows.values,
                          prompt_lens=rows.prompt_lens if share_prompts else None)

