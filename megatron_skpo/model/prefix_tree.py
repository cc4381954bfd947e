"""Laying rows out so that shared prompt prefixes are computed once (used by ``model/packing.py``).

A *tree* is a set of rows with the same prompt: its *trunk* is the prompt minus its last token,
and each row has a *branch*: the prompt's last token (repeated per row, because its output
predicts a different first response token in each row) followed by the row's response. Within
one micro-batch the trunks of all trees are merged into a radix trie, so a prefix shared by
different prompts (a few-shot prompt's shots, a chat template's system turn) is laid out once too.

Every trie node and every branch is a *segment* with a parent segment. A token attends to the
tokens of its own segment and of its ancestors with a position not after its own, never to a
sibling, and every token keeps the position it has in its own row: the packed forward equals the
per-row forwards. Where rows diverge right after a shared node, that node's last token has no
single next token: it gets no target (0) and no loss. This is sound because sharing requires every
row to carry no loss and zero per-token values on its trunk (the prompt), so nothing reads those
positions (:func:`find_trees` checks it, and rows that fail are laid out alone).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Tree:
    """Rows with one prompt: ``trunk`` shared tokens (prompt length - 1), then one branch per row."""

    rows: tuple[int, ...]  # caller indices, ascending
    trunk: int  # 0: the row is laid out alone (no sharing)

    def size(self, lengths: Sequence[int]) -> int:
        return self.trunk + sum(lengths[r] - self.trunk for r in self.rows)


def _quiet_trunk(r: int, trunk: int, loss_masks, token_values) -> bool:
    """Row r carries no loss and zero values on its trunk's targets (tokens 1..trunk)."""
    return all(not bool(x[r][1:trunk + 1].float().any()) for x in (loss_masks, *token_values.values()))


def find_trees(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor], prompt_lens: Sequence[int],
               token_values: Optional[dict[str, Sequence[torch.Tensor]]] = None, budget: Optional[int] = None
               ) -> list[Tree]:
    """Group rows by their prompt (``prompt_lens[i]`` leading tokens of row i) into trees.

    A row shares only if its trunk carries no loss and zero values; a tree larger than ``budget``
    is cut into consecutive trees with the same trunk.
    """
    token_values = token_values or {}
    lengths = [len(t) for t in tokens]
    by_prompt: dict[tuple, list[int]] = {}
    for i, (t, p) in enumerate(zip(tokens, prompt_lens)):
        share = 2 <= p < len(t) and _quiet_trunk(i, p - 1, loss_masks, token_values)
        by_prompt.setdefault(tuple(t[:p].tolist()) if share else ("row", i), []).append(i)
    trees: list[Tree] = []
    for key, rows in by_prompt.items():
        trunk = len(key) - 1 if key[0] != "row" else 0
        trees += _cut(rows, trunk, lengths, budget)
    return sorted(trees, key=lambda tr: tr.rows[0])


def _cut(rows: list[int], trunk: int, lengths: list[int], budget: Optional[int]) -> list[Tree]:
    if not trunk:
        return [Tree((r,), 0) for r in rows]
    out, cur = [], []
    for r in rows:
        if budget is not None and cur and Tree(tuple(cur + [r]), trunk).size(lengths) > budget:
            out.append(cur)
            cur = []
        cur.append(r)
    return [Tree(tuple(c), trunk) for c in out + [cur]]


@dataclass
class _Node:
    """A radix-trie node: its own tokens, at positions ``depth..depth+len``; trees whose trunk ends here."""

    tokens: tuple[int, ...]
    depth: int
    children: dict[int, "_Node"] = field(default_factory=dict)
    trees: list[Tree] = field(default_factory=list)


def _insert(node: _Node, seq: tuple[int, ...], tree: Tree) -> None:
    """Insert the trunk ``seq`` (the part below ``node``) of ``tree``, splitting nodes at divergences."""
    while seq:
        child = node.children.get(seq[0])
        if child is None:
            node.children[seq[0]] = _Node(seq, node.depth + len(node.tokens), trees=[tree])
            return
        n = next((i for i, (a, b) in enumerate(zip(child.tokens, seq)) if a != b), min(len(child.tokens), len(seq)))
        if n < len(child.tokens):  # the trunks diverge inside ``child``: split it there
            rest = _Node(child.tokens[n:], child.depth + n, child.children, child.trees)
            child.tokens, child.children, child.trees = child.tokens[:n], {rest.tokens[0]: rest}, []
        node, seq = child, seq[n:]
    node.trees.append(tree)


def build_trie(trees: Sequence[Tree], tokens: Sequence[torch.Tensor]) -> _Node:
    """The radix trie of the trunks of ``trees`` (a root without tokens; unshared trees are not in it)."""
    root = _Node((), 0)
    for tree in trees:
        if tree.trunk:
            _insert(root, tuple(tokens[tree.rows[0]][:tree.trunk].tolist()), tree)
    return root


class Layout:
    """Appends segments to one micro-batch and records rows, segments and attention blocks."""

    def __init__(self, tokens, loss_masks, token_values: dict):
        self.src_tokens, self.src_masks, self.src_values = tokens, loss_masks, token_values
        self.ids, self.pos, self.tgt, self.mask, self.seg = [], [], [], [], []
        self.vals = {k: [] for k in token_values}
        self.parents: list[int] = []
        self.rows: list[tuple[int, torch.Tensor, int]] = []  # (caller index, positions, length)
        self.blocks: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []  # (q start, q end, key ranges)
        self.size = 0

    def segment(self, ids, targets, mask, values: dict, positions, parent: int) -> tuple[int, int]:
        start, sid = self.size, len(self.parents)
        self.ids.append(ids), self.pos.append(positions), self.tgt.append(targets), self.mask.append(mask)
        self.seg.append(torch.full((len(ids),), sid, dtype=torch.long))
        for k in self.vals:
            self.vals[k].append(values[k])
        self.parents.append(parent)
        self.size += len(ids)
        return start, self.size

    def node(self, node: _Node, parent: int, ancestors: tuple[tuple[int, int], ...], path: torch.Tensor) -> None:
        """A trie node (its tokens never carry loss), then its trees' branches, then its children."""
        r0 = (node.trees[0].rows[0] if node.trees else _any_row(node))
        seq = self.src_tokens[r0].long()
        a, b = node.depth, node.depth + len(node.tokens)
        ends_one_trunk = not node.children and len(node.trees) == 1
        nxt = seq[b:b + 1] if ends_one_trunk else seq.new_zeros(1)  # no single next token where rows diverge
        zero = torch.zeros(b - a)
        span = self.segment(seq[a:b], torch.cat([seq[a + 1:b], nxt]), zero, {k: zero for k in self.vals},
                            torch.arange(a, b), parent)
        sid, path = len(self.parents) - 1, torch.cat([path, torch.arange(*span)])
        q_start = span[0]
        for tree in node.trees:
            for r in tree.rows:
                self.branch(r, tree.trunk, path, sid)
        self.blocks.append((q_start, self.size, (*ancestors, (q_start, self.size))))
        for child in node.children.values():
            self.node(child, sid, (*ancestors, span), path)

    def branch(self, r: int, trunk: int, trunk_at: torch.Tensor, parent: int) -> None:
        seq, zero = self.src_tokens[r].long(), torch.zeros(1)
        span = self.segment(seq[trunk:], torch.cat([seq[trunk + 1:], seq.new_zeros(1)]),
                            torch.cat([self.src_masks[r][trunk + 1:].float(), zero]),
                            {k: torch.cat([v[r][trunk + 1:].float(), zero]) for k, v in self.src_values.items()},
                            torch.arange(trunk, len(seq)), parent)
        self.rows.append((r, torch.cat([trunk_at, torch.arange(*span)]), len(seq)))
        if parent < 0:
            self.blocks.append((span[0], span[1], (span,)))

    def pad(self, n: int) -> None:
        """One dummy row of ``n`` tokens, never trained on."""
        zero = torch.zeros(n)
        span = self.segment(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), zero,
                            {k: zero for k in self.vals}, torch.arange(n), -1)
        self.rows.append((-1, torch.arange(*span), n))
        self.blocks.append((span[0], span[1], (span,)))


def _any_row(node: _Node) -> int:
    """A row whose trunk passes through ``node`` (the node's tokens are the same in all of them)."""
    while not node.trees:
        node = next(iter(node.children.values()))
    return node.trees[0].rows[0]


def lay_out(trees: Sequence[Tree], tokens, loss_masks, token_values: dict) -> Layout:
    """Unshared rows (trunk 0) in order, then the trie of the shared trees."""
    layout = Layout(tokens, loss_masks, token_values)
    for tree in trees:
        if not tree.trunk:
            layout.branch(tree.rows[0], 0, torch.zeros(0, dtype=torch.long), -1)
    for child in build_trie(trees, tokens).children.values():
        layout.node(child, -1, (), torch.zeros(0, dtype=torch.long))
    return layout
