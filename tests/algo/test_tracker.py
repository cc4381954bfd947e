"""SPO's KL-adaptive tracker: the update rule, per-prompt KL, ValueTracker state and sampling."""
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.algo.tracker import KeyedEMA, ValueTracker, forgetting_factor, kl_adaptive_update, policy_drift

DEF = dict(rho_min=0.875, rho_max=0.96, d_half=8.0)  # the rule's shape at a round half-life


def _upd(v, n, x, d):
    out = kl_adaptive_update(torch.tensor([v], dtype=torch.float64), torch.tensor([n], dtype=torch.float64),
                             torch.tensor([x], dtype=torch.float64), d, **DEF)
    return float(out[0]), float(out[1])


@pytest.mark.parametrize("d,rho", [
    (0.0, 0.96),  # 2^0 = 1 -> clipped to rho_max
    (-3.0, 0.96),  # negative estimate clamped to 0
    (1.0, 2 ** (-1 / 8)),  # 0.917, inside the clip range
    (8.0, 0.875),  # 2^-1 = 0.5 -> clipped to rho_min
    (1e9, 0.875),
], ids=["zero", "negative", "inside", "half-life", "huge"])
def test_update_rule_hand_values(d, rho):
    v, n = _upd(0.25, 2.0, 1.0, d)
    assert n == pytest.approx(rho * 2 + 1, abs=1e-15)
    assert v == pytest.approx(0.25 + 0.75 / (rho * 2 + 1), abs=1e-15)


def test_first_observation_overwrites():
    assert _upd(0.5, 0.0, 0.8, 3.0) == (0.8, 1.0)


def test_update_rejects_bad_rho():
    with pytest.raises(ValueError, match="rho_min"):
        kl_adaptive_update(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0, 0.9, 0.8, 8.0)


def test_policy_drift_is_the_token_mean_absolute_difference():
    then = torch.tensor([[-1.0, -1.5, 0.0], [-1.0, 0.0, 0.0], [-1.0, -4.0, 0.0]])
    now = torch.tensor([[0.0, -1.0, 9.0], [-2.0, 5.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # |diffs| on valid tokens: row0 (1, 0.5) -> 0.75; row1 (1) -> 1; row2 has none -> 0
    torch.testing.assert_close(policy_drift(then, now, mask), torch.tensor([0.75, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="logp_now"):
        policy_drift(then, now[:, :1], mask)


@pytest.mark.parametrize("d,rho,clipped", [
    (0.0, 0.96, True),  # a prompt seen for the first time: rho_max
    (0.06 * 0.5, 2 ** -0.5, True),  # 0.707 < 0.875: clipped up to rho_min
    (0.06 * 0.1, 2 ** -0.1, False),  # 0.933, inside [0.875, 0.96]
    (0.06, 0.875, True),  # the half-life: 0.5 -> rho_min
], ids=["unseen", "fast", "inside", "half-life"])
def test_forgetting_factor_with_the_spo_half_life(d, rho, clipped):
    got, hit = forgetting_factor(torch.tensor([d]), 0.875, 0.96, 0.06)
    assert got.item() == pytest.approx(min(max(rho, 0.875), 0.96)) and bool(hit) == clipped


def test_beta_prior_and_update_hand_worked():
    """Prior Beta(0.5, 0.5); observe r = +1 (r' = 1) at D = 0 (rho = 0.96), then r = -1 at D = 0.006."""
    tr = ValueTracker()  # prior="beta", d_half = 0.06
    a, b = tr.beta_params(["q"])
    assert (a.item(), b.item()) == (0.5, 0.5) and tr.value(["q"]).item() == 0.0
    tr.observe(["q"], torch.tensor([1.0]), 0.0)
    a1, b1 = 0.96 * 0.5 + 1, 0.96 * 0.5 + 0  # alpha <- rho alpha + r', beta <- rho beta + (1 - r')
    a, b = tr.beta_params(["q"])
    assert (a.item(), b.item()) == (pytest.approx(a1), pytest.approx(b1))
    rho = 2 ** -0.1
    tr.observe(["q"], torch.tensor([-1.0]), 0.006)
    a2, b2 = rho * a1 + 0, rho * b1 + 1
    assert tr.success_prob(["q"]).item() == pytest.approx(a2 / (a2 + b2))
    assert tr.counts(["q"]).item() == pytest.approx(a2 + b2)
    assert ValueTracker(prior="first_observation").counts(["new"]).item() == 0.0
    with pytest.raises(ValueError, match="prior"):
        ValueTracker(prior="uniform")


def _loop_reference(events, init, init_count):
    """Scalar per-key replay of (key, obs, D) events in order."""
    state = {}
    for k, x, d in events:
        v, n = state.get(k, (init, init_count))
        rho = min(max(2 ** (-max(d, 0.0) / 0.06), 0.875), 0.96)
        n = rho * n + 1
        state[k] = (v + (x - v) / n, n)
    return state


@pytest.mark.parametrize("prior,count", [("beta", 1.0), ("first_observation", 0.0)])
@settings(max_examples=30, deadline=None)
@given(batches=st.lists(st.lists(st.tuples(st.sampled_from(["a", "b", 3, 7]), st.floats(-1, 1),
                                           st.floats(-2, 0.5)), min_size=1, max_size=8), min_size=1, max_size=4))
def test_value_tracker_matches_loop_with_repeated_keys(prior, count, batches):
    tr = ValueTracker(prior=prior)
    for batch in batches:
        keys = [k for k, _, _ in batch]
        tr.observe(keys, torch.tensor([x for _, x, _ in batch]), torch.tensor([d for _, _, d in batch]))
    ref = _loop_reference([(k, (x + 1) / 2, d) for b in batches for k, x, d in b], 0.5, count)
    keys = list(ref)
    torch.testing.assert_close(tr.success_prob(keys), torch.tensor([ref[k][0] for k in keys], dtype=torch.float64))
    torch.testing.assert_close(tr.counts(keys), torch.tensor([ref[k][1] for k in keys], dtype=torch.float64))


def test_repeated_keys_apply_in_batch_order():
    # "q" observed -1 then +1 in one batch, D = 0: v = 0 (overwrite), then 0 + 1 / 1.96.
    tr = ValueTracker(prior="first_observation")
    tr.observe(["q", "p", "q"], torch.tensor([-1.0, 1.0, 1.0]), 0.0)
    assert float(tr.success_prob(["q"])) == pytest.approx(1 / 1.96)
    assert float(tr.counts(["q"])) == pytest.approx(1.96)
    reversed_order = ValueTracker(prior="first_observation")
    reversed_order.observe(["q", "q"], torch.tensor([1.0, -1.0]), 0.0)
    assert float(reversed_order.success_prob(["q"])) == pytest.approx(1 - 1 / 1.96)


def test_value_mapping_and_unseen_defaults():
    tr = ValueTracker(prior="first_observation")
    assert tr.value(["new"]).tolist() == [0.0] and tr.success_prob(["new"]).tolist() == [0.5]
    tr.observe([1], torch.tensor([0.5]), 0.0)  # r' = 0.75 overwrites
    assert tr.success_prob([1]).tolist() == [0.75] and tr.value([1]).tolist() == [0.5]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tr.observe([1], torch.tensor([2.0]), 0.0)


def test_weights():
    tr = ValueTracker(priority_floor=0.05, prior="first_observation")
    tr.observe(["solved", "failed", "half"], torch.tensor([1.0, -1.0, 0.0]), 0.0)
    w = tr.weights(["solved", "failed", "half", "unseen"])
    torch.testing.assert_close(w, torch.tensor([0.05, 0.05, 0.55, 0.55], dtype=torch.float64))


def test_sample_prompts_deterministic_distinct_and_weighted():
    tr = ValueTracker(prior="first_observation")
    tr.observe(["solved"], torch.tensor([1.0]), 0.0)
    cands = ["solved", "u1", "u2", "u3"]
    a = tr.sample_prompts(cands, 3, torch.Generator().manual_seed(1))
    b = tr.sample_prompts(cands, 3, torch.Generator().manual_seed(1))
    assert a == b and len(set(a)) == 3 and set(a) <= set(cands)
    assert sorted(tr.sample_prompts(cands, 4, torch.Generator().manual_seed(2))) == sorted(cands)
    g = torch.Generator().manual_seed(0)
    picks = [tr.sample_prompts(["solved", "unseen"], 1, g)[0] for _ in range(2000)]
    assert 0.89 < picks.count("unseen") / 2000 < 0.945  # 0.55 / 0.60 = 0.917
    with pytest.raises(ValueError, match="candidates"):
        tr.sample_prompts(cands, 5, g)


def test_state_dict_round_trip_weights_only():
    tr = ValueTracker()
    tr.observe(["a", 5, "a"], torch.tensor([1.0, -0.5, 0.0]), torch.tensor([0.1, 2.0, 30.0]))
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)
    buf.seek(0)
    back = ValueTracker()
    back.load_state_dict(torch.load(buf, weights_only=True))
    keys = ["a", 5, "zz"]
    assert torch.equal(back.value(keys), tr.value(keys)) and torch.equal(back.counts(keys), tr.counts(keys))
    back.observe([5], torch.tensor([1.0]), 0.0)  # still updatable after loading
    tr.observe([5], torch.tensor([1.0]), 0.0)
    assert torch.equal(back.value([5]), tr.value([5]))
    with pytest.raises(ValueError, match="keys"):
        back.load_state_dict({"keys": ["a"], "value": torch.zeros(2), "count": torch.zeros(2)})


def test_keyed_ema_unmapped_init():
    ema = KeyedEMA(init_value=100.0)
    assert ema.read(["x"])[0].tolist() == [100.0]
    ema.observe(["x"], torch.tensor([10.0]), 0.0)
    ema.observe(["x"], torch.tensor([20.0]), 8.0)  # rho = 0.875: N = 1.875
    assert ema.read(["x"])[0].item() == pytest.approx(10 + 10 / 1.875)
    assert len(ema) == 1 and "x" in ema and math.isclose(ema.read(["x"])[1].item(), 1.875)
