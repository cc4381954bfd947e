"""Sequence packing: variable-length rows -> micro-batches of at most a token budget, with shared
prompts computed once.

Rows that start with the same prompt (a GRPO group's G responses, SKPO's G downstream responses
of one [s, q]) may form a *tree*: the prompt minus its last token is laid out once (the trunk),
then each row's *branch*: the prompt's last token followed by the row's response. A branch
attends to its trunk and to itself, never to a sibling, and every token keeps the position it has
in its own row, so every log-prob equals the unshared one (tested against per-row forwards). The
prompt's last token is repeated in each branch because its output predicts a different first
response token in each row. A row with a prompt of its own is a tree of one branch and no trunk:
exactly a plain packed sequence. With few-shot prompts that are most of every row, sharing cuts
the tokens a training step pushes through the model by several times.

Rows share a trunk only when their prompt tokens and, on the trunk, their loss masks and
per-token values agree (so nothing a loss reads can differ between them). Trees are assigned to
micro-batches by first-fit decreasing on their token count; a tree larger than the budget is cut
into several trees with the same trunk.

Attention masks (True = attention NOT allowed, megatron's convention):
* ``attention_mask()``: ``[1, 1, S, S]`` bool over the whole micro-batch (megatron-core's local
  ``DotProductAttention``);
* ``attention_blocks()``: the same mask as one block per tree (attention never crosses trees), for
  :class:`~megatron_skpo.model.attention.SDPAttention`, which then costs ``sum_k s_k^2``, not ``S^2``;
* ``packed_seq_params()`` (``thd``, ``cu_seqlens``) for Transformer Engine's varlen attention, only
  when no trunk is shared (varlen attention cannot express a shared prefix).

Positions: ``position_ids`` is each token's position in its own row. With megatron-core's local
spec the rotary embeddings are taken at these positions (``model/train_step.py``), so a packed
forward equals the per-row forwards for shared and unshared trees alike.

Targets: the token after each position *within its row*; the last position of a row has no
target (target 0, ``loss_mask`` 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Tree:
    """Rows laid out behind one trunk of ``trunk`` tokens (their common prompt minus its last token)."""

    rows: tuple[int, ...]  # caller indices, ascending
    trunk: int  # 0: no sharing (a single row)

    def size(self, lengths: Sequence[int]) -> int:
        return self.trunk + sum(lengths[r] - self.trunk for r in self.rows)


@dataclass
class AttentionBlocks:
    """A micro-batch's attention as independent blocks ``(start, end, mask)``: ``mask`` is
    ``[1, 1, n, n]`` bool (True = masked) or None for a plain causal block."""

    blocks: list[tuple[int, int, Optional[torch.Tensor]]]


@dataclass
class PackedBatch:
    """One packed micro-batch: ``n`` rows (a padding row last, if any), ``S`` tokens in total."""

    tokens: torch.Tensor  # [1, S] int64
    position_ids: torch.Tensor  # [1, S] int64, each token's position in its own row
    targets: torch.Tensor  # [S] int64, next token within the row (0 where none)
    loss_mask: torch.Tensor  # [S] float32, 1 where the target is trained on
    seq_lens: list[int]  # [n] row lengths L_i
    seq_index: list[int]  # [n] index of each row in the caller's list (-1: padding)
    row_positions: list[torch.Tensor]  # [n] each [L_i] int64: packed position of token t of the row
    tree_spans: list[tuple[int, int]]  # [k] [start, end) of each tree in the packed row
    branch: torch.Tensor  # [S] int64: 0 on a shared trunk, else the id (>= 1) of the position's row
    token_values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S] per-token inputs

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def shared(self) -> bool:
        """Some trunk is shared (then the layout is not one contiguous sequence per row)."""
        return bool((self.branch == 0).any())

    def cu_seqlens(self) -> torch.Tensor:
        """``[n + 1]`` int32 cumulative row lengths (the ``thd`` layout's boundaries; unshared only)."""
        if self.shared:
            raise ValueError("cu_seqlens: this micro-batch shares prompt trunks; varlen attention cannot express it")
        return torch.cumsum(torch.tensor([0] + self.seq_lens, dtype=torch.int32), 0, dtype=torch.int32)

    def _allowed(self, start: int, end: int) -> torch.Tensor:
        pos, br = self.position_ids[0, start:end], self.branch[start:end]
        causal = pos[None, :] <= pos[:, None]
        return causal & ((br[None, :] == 0) | (br[None, :] == br[:, None]))

    def attention_mask(self) -> torch.Tensor:
        """``[1, 1, S, S]`` bool, True where attention is *not* allowed."""
        allowed = torch.zeros(self.num_tokens, self.num_tokens, dtype=torch.bool)
        for s, e in self.tree_spans:
            allowed[s:e, s:e] = self._allowed(s, e)
        return ~allowed[None, None]

    def attention_blocks(self) -> AttentionBlocks:
        """One block per tree; a tree that is a single row is a plain causal block (mask None)."""
        out = []
        for s, e in self.tree_spans:
            single = bool((self.branch[s:e] == self.branch[s]).all()) and int(self.branch[s]) != 0
            out.append((s, e, None if single else ~self._allowed(s, e)[None, None]))
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
                           self.seq_lens, self.seq_index, self.row_positions, self.tree_spans, move(self.branch),
                           {k: move(v) for k, v in self.token_values.items()})


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


def _trunk_agrees(a: int, b: int, trunk: int, loss_masks, token_values) -> bool:
    """Rows a and b read the same loss mask and values on the trunk's targets (tokens 1..trunk)."""
    pairs = [(loss_masks[a], loss_masks[b])] + [(v[a], v[b]) for v in token_values.values()]
    return all(torch.equal(x[1:trunk + 1].float(), y[1:trunk + 1].float()) for x, y in pairs)


def find_trees(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], prompt_lens: Sequence[int],
               token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, budget: Optional[int] = None
               ) -> list[Tree]:
    """Group rows by their prompt (``prompt_lens[i]`` leading tokens of row i) into trees.

    A row shares only with rows whose prompt is identical and whose trunk values agree; a tree
    whose size exceeds ``budget`` is cut into consecutive trees with the same trunk.
    """
    token_values = token_values or {}
    by_prompt: dict[tuple, list[int]] = {}
    for i, (t, p) in enumerate(zip(tokens, prompt_lens)):
        key = tuple(t[:p].tolist()) if 2 <= p < len(t) else ("row", i)
        by_prompt.setdefault(key, []).append(i)
    trees: list[Tree] = []
    for key, rows in by_prompt.items():
        trunk = len(key) - 1 if key[0] != "row" else 0
        while rows:
            head, rest = rows[0], rows[1:]
            mine = [head] + [r for r in rest if trunk and _trunk_agrees(head, r, trunk, loss_masks, token_values)]
            rows = [r for r in rest if r not in mine]
            trees += _cut(mine, trunk if len(mine) > 1 else 0, [len(t) for t in tokens], budget)
    return sorted(trees, key=lambda tr: tr.rows[0])


def _cut(rows: list[int], trunk: int, lengths: list[int], budget: Optional[int]) -> list[Tree]:
    if budget is None or not trunk:
        return [Tree(tuple(rows), trunk)] if trunk else [Tree((r,), 0) for r in rows]
    out, cur = [], []
    for r in rows:
        if cur and Tree(tuple(cur + [r]), trunk).size(lengths) > budget:
            out.append(cur)
            cur = []
        cur.append(r)
    out.append(cur)
    return [Tree(tuple(c), trunk if len(c) > 1 else 0) for c in out]


class _Builder:
    """Appends trees and rows to one micro-batch."""

    def __init__(self, token_values: dict):
        self.ids, self.pos, self.tgt, self.mask, self.branch = [], [], [], [], []
        self.vals = {k: [] for k in token_values}
        self.rows, self.lens, self.index, self.spans, self.size, self.next_branch = [], [], [], [], 0, 1

    def segment(self, seq, targets, mask, values: dict, positions, branch: int) -> torch.Tensor:
        n = len(seq)
        self.ids.append(seq), self.pos.append(positions), self.tgt.append(targets), self.mask.append(mask)
        self.branch.append(torch.full((n,), branch, dtype=torch.long))
        for k, v in values.items():
            self.vals[k].append(v)
        at = torch.arange(self.size, self.size + n)
        self.size += n
        return at

    def tree(self, tree: Tree, tokens, loss_masks, token_values) -> None:
        start, trunk_at = self.size, torch.zeros(0, dtype=torch.long)
        if tree.trunk:
            r0, t = tree.rows[0], tree.trunk
            seq = tokens[r0].long()
            trunk_at = self.segment(seq[:t], seq[1:t + 1], loss_masks[r0][1:t + 1].float(),
                                    {k: v[r0][1:t + 1].float() for k, v in token_values.items()},
                                    torch.arange(t), 0)
        for r in tree.rows:
            self.row(r, tree.trunk, trunk_at, tokens[r].long(), loss_masks[r], {k: v[r] for k, v in token_values.items()})
        self.spans.append((start, self.size))

    def row(self, r: int, trunk: int, trunk_at, seq, loss_mask, values: dict) -> None:
        zero = torch.zeros(1)
        at = self.segment(seq[trunk:], torch.cat([seq[trunk + 1:], seq.new_zeros(1)]),
                          torch.cat([loss_mask[trunk + 1:].float(), zero]),
                          {k: torch.cat([v[trunk + 1:].float(), zero]) for k, v in values.items()},
                          torch.arange(trunk, len(seq)), self.next_branch)
        self.next_branch += 1
        self.rows.append(torch.cat([trunk_at, at])), self.lens.append(len(seq)), self.index.append(r)

    def build(self, pad_to: int) -> PackedBatch:
        pad = -self.size % pad_to
        if pad:  # one dummy row, never trained on
            start = self.size
            at = self.segment(torch.zeros(pad, dtype=torch.long), torch.zeros(pad, dtype=torch.long),
                              torch.zeros(pad), {k: torch.zeros(pad) for k in self.vals}, torch.arange(pad),
                              self.next_branch)
            self.rows.append(at), self.lens.append(pad), self.index.append(-1), self.spans.append((start, self.size))
        return PackedBatch(torch.cat(self.ids)[None], torch.cat(self.pos)[None], torch.cat(self.tgt),
                           torch.cat(self.mask), self.lens, self.index, self.rows, self.spans, torch.cat(self.branch),
                           {k: torch.cat(v) for k, v in self.vals.items()})


def pack_trees(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], trees: Sequence[Tree],
               token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, pad_to: int = 1) -> PackedBatch:
    """Lay ``trees`` out as one micro-batch (see the module docstring).

    ``loss_masks[i][t]`` says whether the token *at* position t of row i is trained on (its log-prob
    is predicted from position t-1); ``token_values[name][i]`` are per-token ``[L_i]`` values aligned
    the same way (e.g. advantages, old log-probs of that token).
    """
    token_values = token_values or {}
    b = _Builder(token_values)
    for tree in trees:
        b.tree(tree, tokens, loss_masks, token_values)
    return b.build(pad_to)


def pack(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], index: list[int],
         token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, pad_to: int = 1) -> PackedBatch:
    """Rows ``index`` as one micro-batch, each row its own sequence (no sharing)."""
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
