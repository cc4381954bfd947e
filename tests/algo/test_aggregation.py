"""Aggregation: hand values per mode, and per-rank contributions that sum to the global mean."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.algo.aggregation import AGG_MODES, aggregate, count_seqs, count_tokens
from megatron_skpo.config import ConfigError, load_config

D = torch.float64
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [7.0, 0.0, 0.0]], dtype=D)
M = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)  # row 2 is empty

# (mode, expected): sums 6 and 9 over 5 tokens and 2 non-empty sequences; norm_length 4
HAND = [
    ("token-mean", 15 / 5),
    ("seq-mean-token-mean", (6 / 3 + 9 / 2) / 2),
    ("seq-mean-token-sum", 15 / 2),
    ("seq-mean-token-sum-norm", 15 / (2 * 4)),
]


def test_config_accepts_exactly_these_modes():
    """One list of modes: the config validates against it (no copy to drift apart)."""
    for mode in AGG_MODES:
        assert load_config(None, [f"algo.skpo.downstream_agg_mode={mode}"]).algo.skpo.downstream_agg_mode == mode
    with pytest.raises(ConfigError, match="algo.skpo.upstream_agg_mode: got 'mean'"):
        load_config(None, ["algo.skpo.upstream_agg_mode=mean"])


@pytest.mark.parametrize("mode,expected", HAND, ids=[h[0] for h in HAND])
def test_hand_values(mode, expected):
    assert count_tokens(M) == 5 and count_seqs(M) == 2
    got = aggregate(X, M, mode, count_tokens(M), count_seqs(M), norm_length=4)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=D))


def test_values_outside_mask_are_ignored_even_nan():
    x = X.clone()
    x[2, 0] = float("nan")
    x[1, 2] = float("inf")
    for mode, expected in HAND:
        torch.testing.assert_close(aggregate(x, M, mode, 5, 2, norm_length=4), torch.tensor(expected, dtype=D))


def test_empty_rank_and_empty_batch_give_zero_not_nan():
    x = torch.ones(2, 3, dtype=D, requires_grad=True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGG_MODES:
        for glob in (0, 7):  # other ranks have tokens / nobody has any
            out = aggregate(x, empty, mode, glob, glob, norm_length=3)
            assert out.item() == 0.0
            (g,) = torch.autograd.grad(out, x)
            assert torch.isfinite(g).all() and g.abs().sum() == 0
    zero_rows = torch.zeros(0, 3, dtype=D)
    assert aggregate(zero_rows, zero_rows.bool(), "seq-mean-token-mean", 4, 2).item() == 0.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'mean'"):
        aggregate(X, M, "mean", 5, 2)
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(X, M, "seq-mean-token-sum-norm", 5, 2)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(X, M[:, :2], "token-mean", 5, 2)
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate(X, M, "token-mean", -1, 2)


def split_sum(x, mask, mode, cuts):
    """Sum of per-'rank' contributions, each with the global counts (what DDP computes)."""
    n_tok, n_seq = count_tokens(mask), count_seqs(mask)
    return sum(
        aggregate(x[a:b], mask[a:b], mode, n_tok, n_seq, norm_length=5)
        for a, b in zip([0] + cuts, cuts + [x.shape[0]])
    )


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_rank_contributions_sum_to_global(mode, ranks):
    g = torch.Generator().manual_seed(ranks)
    x = torch.randn(12, 7, generator=g, dtype=D)
    mask = torch.rand(12, 7, generator=g) > 0.4
    mask[3] = False  # an empty sequence somewhere
    cuts = sorted(torch.randperm(11, generator=g)[: ranks - 1].add(1).tolist())
    whole = aggregate(x, mask, mode, count_tokens(mask), count_seqs(mask), norm_length=5)
    torch.testing.assert_close(split_sum(x, mask, mode, cuts), whole)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000), st.sampled_from(AGG_MODES))
def test_property_global_mean_of_loop_reference(b, t, seed, mode):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g, dtype=D)
    mask = torch.rand(b, t, generator=g) > 0.5
    rows = [[x[i, j].item() for j in range(t) if mask[i, j]] for i in range(b)]
    rows = [r for r in rows if r]
    tokens = [v for r in rows for v in r]
    ref = {
        "token-mean": sum(tokens) / max(len(tokens), 1),
        "seq-mean-token-mean": sum(sum(r) / len(r) for r in rows) / max(len(rows), 1),
        "seq-mean-token-sum": sum(tokens) / max(len(rows), 1),
        "seq-mean-token-sum-norm": sum(tokens) / (max(len(rows), 1) * 5),
    }[mode]
    got = aggregate(x, mask, mode, count_tokens(mask), count_seqs(mask), norm_length=5)
    assert got.item() == pytest.approx(ref, abs=1e-12)
    cut = [b // 2] if 0 < b // 2 < b else []
    torch.testing.assert_close(split_sum(x, mask, mode, cut), got)
