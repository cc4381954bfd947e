"""SKPO split position: length tracker, t_q sampler bounds and determinism, upstream cut."""
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.skpo.split import (LengthTracker, cut_upstream, length_observations,
                                      sample_split_positions, split_bounds)


@pytest.mark.parametrize("length,lo,hi", [
    (1024.0, 171, 512),  # ceil(170.67), floor(512)
    (12.0, 2, 6),  # exact multiples stay exact despite 1/6 being inexact in binary
    (6.0, 1, 3),
    (7.5, 2, 3),  # ceil(1.25), floor(3.75)
    (1.0, 1, 1),  # ceil(1/6) = 1, floor(0.5) = 0 -> raised to the lower bound
    (0.0, 1, 1),  # t_q >= 1 always
], ids=["init", "twelve", "six", "fractional", "one", "zero"])
def test_split_bounds_hand_values(length, lo, hi):
    got = split_bounds(torch.tensor([length]), 1 / 6, 1 / 2)
    assert (int(got[0]), int(got[1])) == (lo, hi)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.floats(0, 1e5), min_size=1, max_size=16), seed=st.integers(0, 2**31),
       fracs=st.tuples(st.floats(0.01, 1), st.floats(0.01, 1)).map(sorted))
def test_uniform_samples_within_bounds(lengths, seed, fracs):
    L = torch.tensor(lengths, dtype=torch.float64)
    t = sample_split_positions(L, fracs[0], fracs[1], torch.Generator().manual_seed(seed))
    lo, hi = split_bounds(L, fracs[0], fracs[1])
    assert t.dtype == torch.long and t.shape == L.shape
    assert bool((t >= lo).all() and (t <= hi).all() and (t >= 1).all())
    assert bool((t >= torch.ceil(L * fracs[0] - 1e-6)).all())
    assert bool(((t <= torch.floor(L * fracs[1] + 1e-6)) | (t == lo)).all())


def test_uniform_covers_range_evenly_and_is_deterministic():
    L = torch.full((6000,), 30.0)  # integers 5..15, 11 values
    t = sample_split_positions(L, 1 / 6, 1 / 2, torch.Generator().manual_seed(3))
    counts = torch.bincount(t, minlength=16)[5:]
    assert counts.numel() == 11 and int(counts.min()) > 6000 / 11 * 0.8
    again = sample_split_positions(L, 1 / 6, 1 / 2, torch.Generator().manual_seed(3))
    assert torch.equal(t, again)
    other = sample_split_positions(L, 1 / 6, 1 / 2, torch.Generator().manual_seed(4))
    assert not torch.equal(t, other)


def test_fixed_alternating_by_step_parity():
    L = torch.tensor([1024.0, 60.0])
    g = torch.Generator().manual_seed(0)
    assert sample_split_positions(L, 1 / 6, 1 / 2, g, "fixed_alternating", step=0).tolist() == [171, 10]
    assert sample_split_positions(L, 1 / 6, 1 / 2, g, "fixed_alternating", step=1).tolist() == [512, 30]
    assert sample_split_positions(L, 1 / 6, 1 / 2, g, "fixed_alternating", step=4).tolist() == [171, 10]
    with pytest.raises(ValueError, match="mode"):
        sample_split_positions(L, 1 / 6, 1 / 2, g, "bogus")


def test_cut_upstream():
    lengths = torch.tensor([100, 7, 1, 100, 3])
    eos = torch.tensor([False, True, True, False, True])
    assert cut_upstream(lengths, eos, 100).tolist() == [100, 3, 1, 100, 1]
    with pytest.raises(ValueError, match="response 1 has 7 < t_q=100"):
        cut_upstream(lengths, torch.zeros(5, dtype=torch.bool), 100)
    with pytest.raises(ValueError, match="t_q"):
        cut_upstream(lengths, eos, 0)


def test_length_observations():
    seg = torch.tensor([10, 20])
    down = torch.tensor([[100, 200, 300, 400], [1, 2, 3, 4]])
    assert length_observations(seg, down).tolist() == [260.0, 22.5]
    assert length_observations(seg, down, "downstream").tolist() == [250.0, 2.5]
    with pytest.raises(ValueError, match="downstream_lengths"):
        length_observations(seg, down[0])


def test_length_tracker_updates_and_round_trip():
    lt = LengthTracker(init_length=1024.0)
    assert lt.lengths(["q"]).tolist() == [1024.0]
    lt.observe(["q", "p"], torch.tensor([300.0, 50.0]), 0.0)  # N = 0 -> first observation overwrites
    lt.observe(["q"], torch.tensor([600.0]), 0.0)  # rho 0.96: N = 1.96, L = 300 + 300 / 1.96
    assert lt.lengths(["q", "p"]).tolist() == pytest.approx([300 + 300 / 1.96, 50.0])
    buf = io.BytesIO()
    torch.save(lt.state_dict(), buf)
    buf.seek(0)
    back = LengthTracker()
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back.lengths(["q", "p", "new"]), lt.lengths(["q", "p", "new"]))
    with pytest.raises(ValueError, match=">= 0"):
        lt.observe(["q"], torch.tensor([-1.0]), 0.0)


def test_unseen_prompts_start_at_the_dataset_mean():
    """unseen="dataset_mean": before any observation init_length; then every observation's mean
    (300, 50, 600 -> 316.67) for a new prompt, while seen prompts keep their own EMA."""
    lt = LengthTracker(init_length=64.0, unseen="dataset_mean")
    assert lt.lengths(["new"]).tolist() == [64.0]
    lt.observe(["q", "p"], torch.tensor([300.0, 50.0]), 0.0)
    assert lt.lengths(["new", "p"]).tolist() == [175.0, 50.0]
    lt.observe(["q"], torch.tensor([600.0]), 0.0)
    assert lt.lengths(["new", "q", "p"]).tolist() == pytest.approx([950 / 3, 300 + 300 / 1.96, 50.0])
    assert "new" not in lt  # reading never adds a prompt
    buf = io.BytesIO()
    torch.save(lt.state_dict(), buf)
    buf.seek(0)
    back = LengthTracker(init_length=64.0, unseen="dataset_mean")
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert back.lengths(["new"]).tolist() == pytest.approx([950 / 3])
    fixed = LengthTracker(init_length=64.0)
    fixed.load_state_dict(lt.state_dict())
    assert fixed.lengths(["new"]).tolist() == [64.0]  # the paper's: every new prompt at init_length
    with pytest.raises(ValueError, match="unseen"):
        LengthTracker(unseen="median")


def test_a_checkpoint_without_the_running_mean_restarts_it_from_its_prompts():
    lt = LengthTracker(init_length=64.0, unseen="dataset_mean")
    lt.observe(["q", "p"], torch.tensor([30.0, 10.0]), 0.0)
    old = {k: v for k, v in lt.state_dict().items() if k in ("keys", "value", "count")}
    back = LengthTracker(init_length=64.0, unseen="dataset_mean")
    back.load_state_dict(old)
    assert back.lengths(["new"]).tolist() == [20.0]
