"""Segment selection by mean NLL: hand values, even/odd G, ties, empty segments, loop reference."""
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.skpo.segment import SEGMENT_SELECTORS, segment_nll, select_segments

D = torch.float64


def scores(nll_values):
    """[G] mean NLLs -> one-token segments with log-prob -d (so d is exactly the value)."""
    lp = -torch.tensor(nll_values, dtype=D).unsqueeze(-1)
    return lp, torch.ones_like(lp, dtype=torch.bool)


def test_segment_nll_hand_values_tensor_and_list():
    lp = torch.tensor([[-1.0, -3.0, -100.0], [-0.5, -0.5, -2.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(segment_nll(lp, mask), torch.tensor([2.0, 1.0], dtype=D))
    as_list = [torch.tensor([-1.0, -3.0], dtype=D), torch.tensor([-0.5, -0.5, -2.0], dtype=D)]
    torch.testing.assert_close(segment_nll(as_list), torch.tensor([2.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match="mask"):
        segment_nll(lp)


# (case id, d values, expected index for median / min / max)
CASES = [
    ("odd", [3.0, 1.0, 2.0, 5.0, 4.0], 0, 1, 3),  # median 3.0 is index 0
    ("even-two-middles", [4.0, 1.0, 3.0, 2.0], 2, 1, 0),  # true median 2.5: 3.0 (idx 2) and 2.0 (idx 3) tie
    ("even-float-rounding", [0.1, 0.7], 0, 0, 1),  # |0.1-0.4| > |0.7-0.4| in floats; rank rule -> 0
    ("duplicates", [2.0, 5.0, 2.0, 1.0, 5.0], 0, 3, 1),  # median 2.0 at 0 and 2 -> lowest index
    ("all-equal", [1.5, 1.5, 1.5], 0, 0, 0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hand_values(case):
    _, values, med, lo, hi = case
    lp, mask = scores(values)
    for name, expected in (("median", med), ("min", lo), ("max", hi)):
        assert select_segments(lp, mask, name).index.item() == expected, name


def test_empty_segments_are_never_selected():
    lp = -torch.tensor([[9.0, 0.0], [1.0, 3.0], [2.0, 0.0], [0.5, 0.0]], dtype=D)
    mask = torch.tensor([[0, 0], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)  # d = nan, 2, 2, 0.5
    assert select_segments(lp, mask, "median").index.item() == 1  # median of {2, 2, 0.5} = 2
    assert select_segments(lp, mask, "min").index.item() == 3
    assert select_segments(lp, mask, "max").index.item() == 1
    gen = torch.Generator().manual_seed(0)
    picks = {select_segments(lp, mask, "random", generator=gen).index.item() for _ in range(40)}
    assert picks == {1, 2, 3}
    with pytest.raises(ValueError, match="prompt 1: every candidate segment is empty"):
        select_segments(lp.expand(2, 4, 2), torch.stack([mask, torch.zeros_like(mask)]), "median")


def test_random_is_reproducible_and_needs_a_generator():
    lp, mask = scores([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    draw = lambda: [select_segments(lp, mask, "random", generator=torch.Generator().manual_seed(5)).index.item()
                    for _ in range(3)]
    assert draw() == draw()
    with pytest.raises(ValueError, match="Generator"):
        select_segments(lp, mask, "random")


def test_minmax_alternating_follows_step_parity():
    lp, mask = scores([2.0, 1.0, 3.0])
    assert [select_segments(lp, mask, "minmax_alternating", step=s).index.item() for s in range(4)] == [1, 2, 1, 2]


def test_unknown_selector_names_the_registry():
    lp, mask = scores([1.0, 2.0])
    with pytest.raises(KeyError, match="segment selector 'mean'"):
        select_segments(lp, mask, "mean")
    assert set(SEGMENT_SELECTORS.names()) >= {"median", "min", "max", "random", "minmax_alternating"}


def median_reference(values):
    """Slow loop: exact (rational) distance to the true median; ties -> lowest index."""
    valid = sorted(Fraction(v) for v in values if v == v)
    n = len(valid)
    med = valid[n // 2] if n % 2 else (valid[n // 2 - 1] + valid[n // 2]) / 2
    best = None
    for k, v in enumerate(values):
        if v == v and (best is None or abs(Fraction(v) - med) < abs(Fraction(values[best]) - med)):
            best = k
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.integers(1, 5), st.integers(0, 10_000))
def test_batched_selection_matches_loop_reference(p, g, t, seed):
    gen = torch.Generator().manual_seed(seed)
    # coarse log-probs so ties and duplicates happen often
    lp = -torch.randint(0, 4, (p, g, t), generator=gen).to(D) / 2
    mask = torch.rand(p, g, t, generator=gen) > 0.3
    mask[:, 0, 0] = True
    choice = select_segments(lp, mask, "median")
    assert choice.index.shape == (p,)
    for i in range(p):
        d = [(-lp[i, k][mask[i, k]]).mean().item() if mask[i, k].any() else float("nan") for k in range(g)]
        torch.testing.assert_close(choice.nll[i], torch.tensor(d, dtype=D), equal_nan=True)
        assert choice.index[i].item() == median_reference(choice.nll[i].tolist())
        valid = [(v, k) for k, v in enumerate(choice.nll[i].tolist()) if v == v]
        assert select_segments(lp[i], mask[i], "min").index.item() == min(valid)[1]
        assert select_segments(lp[i], mask[i], "max").index.item() == max(valid, key=lambda vk: (vk[0], -vk[1]))[1]
