"""EpochSampler: seeded permutations per epoch, exact resume mid-epoch (slow reference: one long run)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.data import EpochSampler


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = EpochSampler(10, seed=3)
    e0, e1 = s.next_indices(10), s.next_indices(10)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["pos"] == 0


def test_same_seed_same_order_other_seed_other_order():
    assert EpochSampler(50, seed=1).next_indices(120) == EpochSampler(50, seed=1).next_indices(120)
    assert EpochSampler(50, seed=1).next_indices(50) != EpochSampler(50, seed=2).next_indices(50)
    assert EpochSampler(5, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 10**6), cuts=st.lists(st.integers(1, 25), min_size=1, max_size=6))
def test_resume_anywhere_reproduces_the_uninterrupted_sequence(n, seed, cuts):
    reference = EpochSampler(n, seed).next_indices(sum(cuts))  # one uninterrupted run
    got, state = [], None
    for c in cuts:  # a new sampler per segment, restored from the previous one's state
        s = EpochSampler(n, seed)
        if state is not None:
            s.load_state_dict(state)
        got += s.next_indices(c)
        state = s.state_dict()
    assert got == reference


def test_state_from_another_dataset_is_refused():
    state = EpochSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="n=10 does not match"):
        EpochSampler(11, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(0)
