"""Sequence packing: variable-length rows -> micro-batches of at most a token budget, with shared
prompt prefixes computed once.

Without ``prompt_lens`` every row is its own sequence: rows are concatenated, attention stays
inside each row (a block-diagonal causal mask), exactly the classic packing. With ``prompt_lens``
rows that share a prompt share its computation (a GRPO group's G responses, SKPO's downstream
group of one [s, q]), and within a micro-batch prefixes shared by different prompts (few-shot
shots, a system turn) are laid out once as well: see :mod:`megatron_skpo.model.prefix_tree` for
the layout and why it is exact. With few-shot prompts that are most of every row, this cuts the
tokens a training step pushes through the model by several times.

Trees (rows with one prompt) are assigned to micro-batches by first-fit decreasing on their
unshared token count (an upper bound: sharing across trees only shrinks a micro-batch); a tree
larger than the budget is cut into several trees with the same trunk.

Attention (True = attention NOT allowed, megatron's convention):
* ``attention_mask()``: ``[1, 1, S, S]`` bool over the whole micro-batch (megatron-core's local
  ``DotProductAttention``);
* ``attention_blocks()``: the same attention as independent blocks (a query range, the key
  positions it may see, a mask), for :class:`~megatron_skpo.model.attention.SDPAttention`, which then
  costs the sum of the blocks' sizes instead of ``S^2``;
* ``packed_seq_params()`` (``thd``, ``cu_seqlens``) for Transformer Engine's varlen attention, only
  for unshared rows (varlen attention cannot express a shared prefix).

Positions: ``position_ids`` is each token's position in its own row; with the local spec the
rotary embeddings are taken at these positions (``model/train_step.py``).

Targets: the token after each position *within its row*; the last position of a row has no
target (target 0, ``loss_mask`` 0), nor has a shared prefix's last token where rows diverge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_skpo.model.prefix_tree import Tree, find_trees, lay_out


@dataclass
class AttentionBlocks:
    """A micro-batch's attention as independent blocks ``(start, end, keys, mask)``: the queries
    ``[start, end)`` see the key positions ``keys`` (``[n_k]`` int64; None = the same range) where
    ``mask`` (``[1, 1, n_q, n_k]`` bool, True = masked) is False; ``mask`` None = plain causal."""

    blocks: list[tuple[int, int, Optional[torch.Tensor], Optional[torch.Tensor]]]


@dataclass
class PackedBatch:
    """One packed micro-batch: ``n`` rows (a padding row last, if any), ``S`` tokens in total, in
    segments (shared prefix nodes and row branches, see ``model/prefix_tree.py``)."""

    tokens: torch.Tensor  # [1, S] int64
    position_ids: torch.Tensor  # [1, S] int64, each token's position in its own row
    targets: torch.Tensor  # [S] int64, next token within the row (0 where none)
    loss_mask: torch.Tensor  # [S] float32, 1 where the target is trained on
    seq_lens: list[int]  # [n] row lengths L_i
    seq_index: list[int]  # [n] index of each row in the caller's list (-1: padding)
    row_positions: list[torch.Tensor]  # [n] each [L_i] int64: packed position of token t of the row
    segment: torch.Tensor  # [S] int64: the segment of each position
    parents: list[int]  # [n_seg] parent segment of each segment (-1: none); parents come first
    blocks: list[tuple[int, int, tuple[tuple[int, int], ...]]]  # (q start, q end, key position ranges)
    token_values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S] per-token inputs

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def shared(self) -> bool:
        """Some row attends to a segment laid out apart from it (a shared prompt prefix)."""
        return any(p >= 0 for p in self.parents)

    def cu_seqlens(self) -> torch.Tensor:
        """``[n + 1]`` int32 cumulative row lengths (the ``thd`` layout's boundaries; unshared only)."""
        if self.shared:
            raise ValueError("cu_seqlens: this micro-batch shares prompt prefixes; varlen attention cannot express it")
        return torch.cumsum(torch.tensor([0] + self.seq_lens, dtype=torch.int32), 0, dtype=torch.int32)

    def _ancestry(self) -> torch.Tensor:
        """[n_seg, n_seg] bool: entry (a, b) is True when b is a or one of a's ancestors."""
        anc = torch.eye(len(self.parents), dtype=torch.bool)
        for s, parent in enumerate(self.parents):
            if parent >= 0:
                anc[s] |= anc[parent]
        return anc

    def _allowed(self, q: torch.Tensor, k: torch.Tensor, anc: torch.Tensor) -> torch.Tensor:
        """[n_q, n_k] bool: query positions ``q`` may attend key positions ``k``."""
        pos, seg = self.position_ids[0].cpu(), self.segment.cpu()
        return anc[seg[q]][:, seg[k]] & (pos[k][None, :] <= pos[q][:, None])

    def attention_mask(self) -> torch.Tensor:
        """``[1, 1, S, S]`` bool, True where attention is *not* allowed."""
        every = torch.arange(self.num_tokens)
        return ~self._allowed(every, every, self._ancestry())[None, None]

    def attention_blocks(self) -> AttentionBlocks:
        """The attention as independent blocks; a row of its own is a plain causal block."""
        anc, out = self._ancestry(), []
        for s, e, ranges in self.blocks:
            if ranges == ((s, e),) and self.parents[int(self.segment[s])] < 0 and bool((self.segment[s:e] ==
                                                                                       self.segment[s]).all()):
                out.append((s, e, None, None))
                continue
            keys = torch.cat([torch.arange(a, b) for a, b in ranges])
            out.append((s, e, None if ranges == ((s, e),) else keys, ~self._allowed(torch.arange(s, e), keys, anc)[None, None]))
        return AttentionBlocks(out)

    def packed_seq_params(self):
        """``PackedSeqParams`` for the Transformer Engine spec (``thd``, varlen attention; unshared only)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens()
        longest = int(max(self.seq_lens))
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=longest, max_seqlen_kv=longest)

    def to(self, device: torch.device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.tokens), move(self.position_ids), move(self.targets), move(self.loss_mask),
                           self.seq_lens, self.seq_index, self.row_positions, move(self.segment), self.parents,
                           self.blocks, {k: move(v) for k, v in self.token_values.items()})


def assign_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: lists of item indices whose total length is <= ``budget``."""
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


def pack_trees(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], trees: Sequence[Tree],
               token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, pad_to: int = 1) -> PackedBatch:
    """Lay ``trees`` out as one micro-batch.

    ``loss_masks[i][t]`` says whether the token *at* position t of row i is trained on (its log-prob
    is predicted from position t-1); ``token_values[name][i]`` are per-token ``[L_i]`` values aligned
    the same way (e.g. advantages, old log-probs of that token).
    """
    layout = lay_out(trees, tokens, loss_masks, token_values or {})
    if -layout.size % pad_to:
        layout.pad(-layout.size % pad_to)
    rows = sorted(layout.rows, key=lambda r: (r[0] < 0, r[1][0].item()))  # unshared rows first, padding last
    return PackedBatch(torch.cat(layout.ids)[None], torch.cat(layout.pos)[None], torch.cat(layout.tgt),
                       torch.cat(layout.mask), [n for _, _, n in rows], [r for r, _, _ in rows],
                       [at for _, at, _ in rows], torch.cat(layout.seg), layout.parents, layout.blocks,
                       {k: torch.cat(v) for k, v in layout.vals.items()})


def padding_batch(n: int) -> PackedBatch:
    """A micro-batch of ``n`` padding tokens only (one row with ``seq_index`` -1, no loss tokens)."""
    layout = lay_out([], [], [], {})
    layout.pad(n)
    return PackedBatch(torch.cat(layout.ids)[None], torch.cat(layout.pos)[None], torch.cat(layout.tgt),
                       torch.cat(layout.mask), [n], [-1], [layout.rows[0][1]], torch.cat(layout.seg), layout.parents,
                       layout.blocks, {})


def pack(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], index: list[int],
         token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, pad_to: int = 1) -> PackedBatch:
    """Rows ``index`` as one micro-batch, each row its own sequence (no sharing), in order."""
    return pack_trees(tokens, loss_masks, [Tree((i,), 0) for i in index], token_values, pad_to)


def pack_sequences(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], budget: int,
                   token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, pad_to: int = 1,
                   prompt_lens: Optional[Sequence[int]] = None) -> list[PackedBatch]:
    """All rows packed into micro-batches of at most ``budget`` tokens.

    ``prompt_lens``: the prompt length of each row; rows with identical prompts then share a trunk.
    None: every row is its own sequence.
    """
    if len(tokens) != len(loss_masks):
        raise ValueError(f"{len(tokens)} token sequences but {len(loss_masks)} loss masks")
    if prompt_lens is None:
        trees = [Tree((i,), 0) for i in range(len(tokens))]
    else:
        trees = find_trees(tokens, loss_masks, prompt_lens, token_values, budget)
    lengths = [len(t) for t in tokens]
    groups = assign_micro_batches([tr.size(lengths) for tr in trees], budget)
    return [pack_trees(tokens, loss_masks, [trees[g] for g in group], token_values, pad_to) for group in groups]


def split_rows(values: torch.Tensor, batch: PackedBatch, pad: float = 0.0) -> torch.Tensor:
    """Packed per-position values ``[S]`` -> ``[n, Lmax]``: row i's values at its tokens' positions
    (real rows only, in ``seq_index`` order, right-padded with ``pad``)."""
    parts = [values[at] for at, i in zip(batch.row_positions, batch.seq_index) if i >= 0]
    return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True, padding_value=pad)


def unpack(values: torch.Tensor, batch: PackedBatch, num_sequences: int) -> list[Optional[torch.Tensor]]:
    """Per-position ``values [S]`` of a micro-batch -> per-row tensors, aligned like the input tokens:
    entry t of row i is the value for token t (0 for the first token)."""
    out: list[Optional[torch.Tensor]] = [None] * num_sequences
    for seq, at in zip(batch.seq_index, batch.row_positions):
        if seq >= 0:
            part = values[at]
            out[seq] = torch.cat([part.new_zeros(1), part[:-1]])
    return out
