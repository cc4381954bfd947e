"""Sequence packing: bin assignment, per-sequence targets/masks, the block-diagonal mask, unpacking."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.model.packing import assign_micro_batches, find_trees, pack, pack_sequences, split_rows, unpack


def test_first_fit_decreasing_hand_worked():
    # lengths 5,4,3,3,1 into budget 8: [5,3] [4,3,1]
    assert assign_micro_batches([3, 5, 1, 4, 3], 8) == [[0, 1], [2, 3, 4]]


def test_too_long_sequence_is_an_error_naming_the_budget():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens.*micro_batch_tokens=8"):
        assign_micro_batches([3, 9], 8)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=15), budget=st.integers(12, 30))
def test_bins_respect_budget_and_cover_every_sequence_once(lengths, budget):
    bins = assign_micro_batches(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)


def test_pack_targets_masks_and_values_hand_worked():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([7, 8])]
    masks = [torch.tensor([0.0, 1, 1]), torch.tensor([0.0, 1])]
    adv = [torch.tensor([9.0, 0.5, 0.25]), torch.tensor([9.0, -1.0])]
    mb = pack(seqs, masks, [0, 1], {"adv": adv}, pad_to=4)
    assert mb.tokens.tolist() == [[1, 2, 3, 7, 8, 0, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert mb.targets.tolist() == [2, 3, 0, 8, 0, 0, 0, 0]  # next token within each sequence
    assert mb.loss_mask.tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert mb.token_values["adv"].tolist() == [0.5, 0.25, 0, -1.0, 0, 0, 0, 0]
    assert mb.seq_lens == [3, 2, 3] and mb.seq_index == [0, 1, -1]
    assert mb.cu_seqlens().tolist() == [0, 3, 5, 8]


def test_attention_mask_is_block_diagonal_causal():
    mb = pack([torch.tensor([1, 2]), torch.tensor([3, 4, 5])], [torch.ones(2), torch.ones(3)], [0, 1])
    allowed = (~mb.attention_mask()[0, 0]).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_unpack_realigns_to_input_tokens():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9])]
    mbs = pack_sequences(seqs, [torch.ones(len(s)) for s in seqs], budget=5)
    out = [None] * 3
    for mb in mbs:  # "log-prob" of the target = the target id itself
        for i, v in enumerate(unpack(mb.targets.float(), mb, 3)):
            out[i] = v if v is not None else out[i]
    assert [o.tolist() for o in out] == [[0, 2, 3], [0, 5], [0, 7, 8, 9]]


def _group(prompt, responses):
    """Rows prompt + response with the prompt untrained and advantages 0 on it (as the trainer builds them)."""
    tokens = [torch.tensor(prompt + r) for r in responses]
    masks = [torch.cat([torch.zeros(len(prompt)), torch.ones(len(r))]) for r in responses]
    adv = [torch.cat([torch.zeros(len(prompt)), torch.full((len(r),), float(k + 1))]) for k, r in enumerate(responses)]
    return tokens, masks, adv


def test_shared_prompt_tree_hand_worked():
    # prompt [1, 2, 3]; responses [4, 5] and [6]: trunk [1, 2], branches [3, 4, 5] and [3, 6]
    tokens, masks, adv = _group([1, 2, 3], [[4, 5], [6]])
    (mb,) = pack_sequences(tokens, masks, 16, {"adv": adv}, prompt_lens=[3, 3])
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 5, 3, 6]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]  # each token at its position in its own row
    assert mb.targets.tolist() == [2, 3, 4, 5, 0, 6, 0]
    assert mb.loss_mask.tolist() == [0, 0, 1, 1, 0, 1, 0]
    assert mb.token_values["adv"].tolist() == [0, 0, 1, 1, 0, 2, 0]
    assert mb.segment.tolist() == [0, 0, 1, 1, 1, 2, 2] and mb.parents == [-1, 0, 0] and mb.shared
    assert [p.tolist() for p in mb.row_positions] == [[0, 1, 2, 3, 4], [0, 1, 5, 6]]
    allowed = (~mb.attention_mask()[0, 0]).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 0, 1, 0],  # the second branch sees the trunk and itself, not its sibling
                       [1, 1, 0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="shares prompt prefixes"):
        mb.packed_seq_params()


def test_shared_rows_read_back_exactly_as_unshared():
    tokens, masks, adv = _group([5, 6, 7, 8], [[1, 2, 3], [4], [9, 9]])
    shared = pack_sequences(tokens, masks, 32, {"adv": adv}, prompt_lens=[4, 4, 4])
    plain = pack_sequences(tokens, masks, 32, {"adv": adv})
    assert shared[0].num_tokens == 3 + 4 + 2 + 3 < plain[0].num_tokens == 7 + 5 + 6
    for name in ("targets", "loss_mask"):
        a = split_rows(getattr(shared[0], name).float(), shared[0])
        b = split_rows(getattr(plain[0], name).float(), plain[0])
        assert torch.equal(a, b), name
    assert torch.equal(split_rows(shared[0].token_values["adv"], shared[0]),
                       split_rows(plain[0].token_values["adv"], plain[0]))
    assert [u.tolist() for u in unpack(shared[0].targets.float(), shared[0], 3)] == \
        [u.tolist() for u in unpack(plain[0].targets.float(), plain[0], 3)]


def test_rows_share_only_a_quiet_prompt_and_trees_fit_the_budget():
    tokens, masks, adv = _group([1, 2, 3], [[4], [5], [6]])
    masks[1][1] = 1.0  # row 1 trains on a prompt token: its prompt cannot be shared
    trees = find_trees(tokens, masks, [3, 3, 3], {"adv": adv})
    assert [(t.rows, t.trunk) for t in trees] == [((0, 2), 2), ((1,), 0)]
    tokens, masks, adv = _group([1, 2, 3], [[4, 4, 4]] * 4)  # tree of 2 + 4 * 4 = 18 tokens
    trees = find_trees(tokens, masks, [3] * 4, {"adv": adv}, budget=10)
    assert [(t.rows, t.trunk) for t in trees] == [((0, 1), 2), ((2, 3), 2)]  # each 2 + 2 * 4 = 10
    assert [t.size([6] * 4) for t in trees] == [10, 10]
    assert find_trees([torch.tensor([1, 2])], [torch.ones(2)], [2])[0].trunk == 0  # nothing after the prompt


def test_prompts_with_a_common_prefix_share_it_across_trees():
    # prompts [1, 2, 3, 4] and [1, 2, 7, 8] (two "shots" then a question): trunks (1, 2, 3) and (1, 2, 7)
    t1, m1, a1 = _group([1, 2, 3, 4], [[5], [6, 6]])
    t2, m2, a2 = _group([1, 2, 7, 8], [[9]])
    (mb,) = pack_sequences(t1 + t2, m1 + m2, 64, {"adv": a1 + a2}, prompt_lens=[4, 4, 4])
    # [1 2] shared node | [3] + branches [4 5], [4 6 6] | [7] + branch [8 9]
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 5, 4, 6, 6, 7, 8, 9]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 2, 3, 4]]
    assert mb.targets.tolist() == [2, 0, 4, 5, 0, 6, 6, 0, 8, 9, 0]  # 2 has no single next token: 3 or 7
    assert mb.parents == [-1, 0, 1, 1, 0, 4]
    allowed = ~mb.attention_mask()[0, 0]
    row2 = mb.row_positions[mb.seq_index.index(2)].tolist()
    assert row2 == [0, 1, 8, 9, 10]
    assert allowed[10].nonzero()[:, 0].tolist() == [0, 1, 8, 9, 10]  # the shared prefix, its own question, itself
    assert allowed[4].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4]
    plain = pack_sequences(t1 + t2, m1 + m2, 64, {"adv": a1 + a2})
    for name in ("loss_mask",):
        assert torch.equal(split_rows(getattr(mb, name), mb)[_order(mb)], split_rows(getattr(plain[0], name), plain[0]))
    assert torch.equal(split_rows(mb.token_values["adv"], mb)[_order(mb)],
                       split_rows(plain[0].token_values["adv"], plain[0]))


def _order(mb):
    """Indices that put a micro-batch's real rows in caller order."""
    real = [i for i in mb.seq_index if i >= 0]
    return torch.tensor(sorted(range(len(real)), key=lambda k: real[k]))


def test_attention_blocks_are_the_mask_cut_per_tree():
    tokens, masks, adv = _group([1, 2, 3], [[4, 5], [6]])
    tokens.append(torch.tensor([9, 8, 7]))
    masks.append(torch.ones(3))
    adv.append(torch.ones(3))
    (mb,) = pack_sequences(tokens, masks, 32, {"adv": adv}, prompt_lens=[3, 3, 1], pad_to=4)
    full = mb.attention_mask()[0, 0]
    covered = torch.zeros_like(full)
    for s, e, keys, m in mb.attention_blocks().blocks:
        keys = torch.arange(s, e) if keys is None else keys
        block = torch.ones(e - s, e - s, dtype=torch.bool).triu_(1) if m is None else m[0, 0]
        assert torch.equal(block, full[s:e][:, keys])
        covered[torch.arange(s, e)[:, None], keys[None, :]] = True
    assert bool(full[~covered].all())  # nothing outside the blocks is allowed
    assert sorted(m is None for *_, m in mb.attention_blocks().blocks) == [False, True, True]  # tree; row, padding
