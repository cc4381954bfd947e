"""Sequence packing: bin assignment, per-sequence targets/masks, the block-diagonal mask, unpacking."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.model.packing import assign_micro_batches, pack, pack_sequences, unpack


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
