"""Sequence packing: variable-length sequences -> micro-batches of at most a token budget.

Sequences are assigned to micro-batches by first-fit decreasing on length, then concatenated
into one row ``[1, S]`` per micro-batch (no padding between sequences). Attention must not cross
sequence boundaries; two equivalent mechanisms are produced:

* ``packed_seq_params`` (``PackedSeqParams``, ``qkv_format="thd"``, ``cu_seqlens``): used with the
  Transformer Engine spec (varlen flash attention, O(S) memory);
* ``attention_mask()`` ``[1, 1, S, S]`` bool, True = masked: a block-diagonal causal mask, used
  with megatron-core's local spec, whose ``DotProductAttention`` rejects ``packed_seq_params``
  (``assert packed_seq_params is None``). It costs S^2 bools per micro-batch, fine on CPU-sized
  budgets.

Positions: with the local spec, GPTModel computes rotary embeddings for positions ``0..S-1`` of
the packed row (``position_ids`` feed only learned absolute embeddings). Because RoPE scores depend
only on the *difference* of positions and the mask keeps attention inside each sequence, this is
mathematically identical to restarting positions per sequence (tested against unpacked
forwards). ``position_ids`` (restarting at 0) are still provided for models that use them.

Targets: the token after each position *within its sequence*; the last position of a sequence has
no target (target 0, ``loss_mask`` 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class PackedBatch:
    """One packed micro-batch of ``n`` sequences, ``S`` tokens in total (after optional padding)."""

    tokens: torch.Tensor  # [1, S] int64
    position_ids: torch.Tensor  # [1, S] int64, restarting at 0 per sequence
    targets: torch.Tensor  # [S] int64, next token within the sequence (0 where none)
    loss_mask: torch.Tensor  # [S] float32, 1 where the target is trained on
    seq_lens: list[int]  # [n] lengths (the padding, if any, is the last "sequence")
    seq_index: list[int]  # [n] index of each sequence in the caller's list (-1: padding)
    token_values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S] per-token inputs

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def cu_seqlens(self) -> torch.Tensor:
        """``[n + 1]`` int32 cumulative lengths (the ``thd`` layout's boundaries)."""
        lens = torch.tensor([0] + self.seq_lens, dtype=torch.int32)
        return torch.cumsum(lens, 0, dtype=torch.int32)

    def attention_mask(self) -> torch.Tensor:
        """``[1, 1, S, S]`` bool, True where attention is *not* allowed (block-diagonal causal)."""
        seq_id = torch.repeat_interleave(torch.arange(len(self.seq_lens)), torch.tensor(self.seq_lens))
        same = seq_id[:, None] == seq_id[None, :]
        causal = torch.ones(self.num_tokens, self.num_tokens, dtype=torch.bool).tril_()
        return ~(same & causal)[None, None]

    def packed_seq_params(self):
        """``PackedSeqParams`` for the Transformer Engine spec (``thd``, varlen attention)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens()
        longest = int(max(self.seq_lens))
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=longest, max_seqlen_kv=longest)

    def to(self, device: torch.device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.tokens), move(self.position_ids), move(self.targets),
                           move(self.loss_mask), self.seq_lens, self.seq_index,
                           {k: move(v) for k, v in self.token_values.items()})


def assign_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: lists of sequence indices whose total length is <= ``budget``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > budget:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than the micro-batch "
                             f"budget parallel.micro_batch_tokens={budget}")
        slot = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(b) for b in bins]


def pack(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], index: list[int],
         token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, pad_to: int = 1) -> PackedBatch:
    """Concatenate sequences ``index`` into one micro-batch.

    ``loss_masks[i][t]`` says whether the token *at* position t of sequence i is trained on (its
    log-prob is predicted from position t-1); ``token_values[name][i]`` are per-token ``[L_i]``
    values aligned the same way (e.g. advantages, old log-probs of that token).
    """
    token_values = token_values or {}
    ids, pos, tgt, mask, vals = [], [], [], [], {k: [] for k in token_values}
    for i in index:
        seq = tokens[i].long()
        ids.append(seq)
        pos.append(torch.arange(len(seq)))
        tgt.append(torch.cat([seq[1:], seq.new_zeros(1)]))
        mask.append(torch.cat([loss_masks[i][1:].float(), torch.zeros(1)]))
        for k, v in token_values.items():
            vals[k].append(torch.cat([v[i][1:].float(), torch.zeros(1)]))
    lens, order = [len(t) for t in ids], list(index)
    pad = -sum(lens) % pad_to
    if pad:  # one dummy sequence, never trained on
        ids.append(torch.zeros(pad, dtype=torch.long)), pos.append(torch.arange(pad))
        tgt.append(torch.zeros(pad, dtype=torch.long)), mask.append(torch.zeros(pad))
        for k in vals:
            vals[k].append(torch.zeros(pad))
        lens.append(pad), order.append(-1)
    return PackedBatch(torch.cat(ids)[None], torch.cat(pos)[None], torch.cat(tgt), torch.cat(mask),
                       lens, order, {k: torch.cat(v) for k, v in vals.items()})


def pack_sequences(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], budget: int,
                   token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None,
                   pad_to: int = 1) -> list[PackedBatch]:
    """All sequences packed into micro-batches of at most ``budget`` tokens (see :func:`pack`)."""
    if len(tokens) != len(loss_masks):
        raise ValueError(f"{len(tokens)} token sequences but {len(loss_masks)} loss masks")
    groups = assign_micro_batches([len(t) for t in tokens], budget)
    return [pack(tokens, loss_masks, g, token_values, pad_to) for g in groups]


def unpack(values: torch.Tensor, batch: PackedBatch, num_sequences: int) -> list[Optional[torch.Tensor]]:
    """Per-token ``values [S]`` of a micro-batch -> per-sequence tensors, aligned like the input
    tokens: entry t of sequence i is the value for token t (0 for the first token)."""
    out: list[Optional[torch.Tensor]] = [None] * num_sequences
    for seq, part in zip(batch.seq_index, torch.split(values, batch.seq_lens)):
        if seq >= 0:
            out[seq] = torch.cat([part.new_zeros(1), part[:-1]])
    return out
