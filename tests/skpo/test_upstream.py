"""SKPO upstream reward R_I and single-stream advantage A~ with the value tracker."""
import math

import pytest
import torch

from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.skpo.upstream import upstream_advantages, upstream_rewards, upstream_step


def test_upstream_rewards_mc_mean_interleaved():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    seg = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # segment 0: [1, 1, -1, 1]; segment 1: [-1, 1, -1, -1]
    assert upstream_rewards(r, seg, 2).tolist() == [0.5, -0.5]


def test_upstream_rewards_loop_reference():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (40,), generator=g).double() * 2 - 1
    seg = torch.randint(0, 5, (40,), generator=g)
    seg[:5] = torch.arange(5)
    want = [sum(float(r[i]) for i in range(40) if seg[i] == s) / int((seg == s).sum()) for s in range(5)]
    torch.testing.assert_close(upstream_rewards(r, seg, 5), torch.tensor(want, dtype=torch.float64))


def test_upstream_rewards_own_completion_and_errors():
    own = torch.tensor([1, -1, 1])
    assert upstream_rewards(torch.zeros(6), torch.zeros(6, dtype=torch.long), 3, "own_completion", own).tolist() == [1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="own_rewards"):
        upstream_rewards(torch.zeros(6), torch.zeros(6, dtype=torch.long), 3, "own_completion")
    with pytest.raises(ValueError, match="segment 1 has no downstream"):
        upstream_rewards(torch.ones(2), torch.tensor([0, 2]), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        upstream_rewards(torch.ones(2), torch.tensor([0, 2]), 2)


def test_upstream_advantages_hand_values():
    # A = [1, -1, 0] - [0, 0, -1] = [1, -1, 1]; mean 1/3; dev [2/3, -4/3, 2/3]; unbiased std 2/sqrt(3).
    adv = upstream_advantages(torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.0, 0.0, -1.0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1, -2, 1], dtype=torch.float64) / math.sqrt(3))
    raw = upstream_advantages(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5]), batch_norm=False)
    assert raw.tolist() == [0.5, -1.5]
    assert upstream_advantages(torch.tensor([0.7]), torch.tensor([0.1])).tolist() == [0.0]  # S = 1
    with pytest.raises(ValueError, match="v_prev"):
        upstream_advantages(torch.zeros(3), torch.zeros(2))


def test_three_steps_use_pre_update_value():
    """Hand-worked V, N and A~ for three steps with a changing per-prompt drift (eps = 0), with the
    first-observation prior and the rule's shape at d_half = 8."""
    tr, keys = ValueTracker(d_half=8.0, prior="first_observation"), ["q0", "q1", "q2"]

    # Step 1: V_prev = 0 (unseen) -> A = R = [1, -1, 0]; mean 0, unbiased std 1. Update (N: 0 -> 1)
    # overwrites: V = R. Had the update come first, A would be [0, 0, 0].
    s1 = upstream_step(tr, keys, torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.3, 5.0, 0.0]), eps=0.0)
    assert s1.v_prev.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(s1.advantages, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(tr.value(keys), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    assert tr.counts(keys).tolist() == [1.0, 1.0, 1.0]

    # Step 2: V_prev = [1, -1, 0], R = [0, 0, 1] -> A = [-1, 1, 1]; mean 1/3, dev [-4/3, 2/3, 2/3],
    # std 2/sqrt(3) -> A~ = [-2, 1, 1] / sqrt(3). D = 0 -> rho = 0.96, N = 1.96;
    # tracked v = [1, 0, 0.5] + (r' - v) / 1.96 with r' = [0.5, 0.5, 1] -> V = [24/49, -24/49, 25/49].
    s2 = upstream_step(tr, keys, torch.tensor([0.0, 0.0, 1.0]), 0.0, eps=0.0)
    assert s2.v_prev.tolist() == [1.0, -1.0, 0.0]
    torch.testing.assert_close(s2.advantages, torch.tensor([-2.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3))
    torch.testing.assert_close(tr.value(keys), torch.tensor([24 / 49, -24 / 49, 25 / 49], dtype=torch.float64))
    torch.testing.assert_close(tr.counts(keys), torch.full((3,), 1.96, dtype=torch.float64))

    # Step 3: R = [1, -1, -1] -> A = [25, -25, -74] / 49; mean -74/147; dev [149, -1, -148] / 147;
    # unbiased std sqrt(22053) / 147 -> A~ = [149, -1, -148] / sqrt(22053).
    # D = [100, 0, -3] -> rho = [0.875, 0.96, 0.96] (negative D clamped to 0):
    # N = [0.875 * 1.96 + 1, 0.96 * 1.96 + 1, same] = [2.715, 2.8816, 2.8816];
    # tracked v = [73, 25, 74] / 98, r' = [1, 0, 0]: v0 = 73/98 + (25/98) / 2.715,
    # v1 = 25/98 (1 - 1/2.8816), v2 = 74/98 (1 - 1/2.8816); V = 2 v - 1.
    s3 = upstream_step(tr, keys, torch.tensor([1.0, -1.0, -1.0]), torch.tensor([100.0, 0.0, -3.0]), eps=0.0)
    torch.testing.assert_close(s3.v_prev, torch.tensor([24 / 49, -24 / 49, 25 / 49], dtype=torch.float64))
    torch.testing.assert_close(s3.advantages, torch.tensor([149.0, -1.0, -148.0], dtype=torch.float64) / math.sqrt(22053))
    torch.testing.assert_close(tr.counts(keys), torch.tensor([2.715, 2.8816, 2.8816], dtype=torch.float64))
    v = torch.tensor([73 / 98 + 25 / 98 / 2.715, 25 / 98 * (1 - 1 / 2.8816), 74 / 98 * (1 - 1 / 2.8816)],
                     dtype=torch.float64)
    torch.testing.assert_close(tr.value(keys), 2 * v - 1)


def test_beta_prior_with_the_spo_half_life_hand_worked():
    """The defaults: Beta(0.5, 0.5) prior (V = 0, N = 1), D_half = 0.06, rho in [0.875, 0.96]."""
    tr, keys = ValueTracker(), ["q0", "q1"]
    # step 1: V_prev = 0 -> A = R = (1, -1) -> A~ = (1, -1)/sqrt(2). D = (0, 0.06): rho = (0.96, 0.875)
    s1 = upstream_step(tr, keys, torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.06]), eps=0.0)
    assert s1.v_prev.tolist() == [0.0, 0.0]
    torch.testing.assert_close(s1.advantages, torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2))
    n1 = torch.tensor([0.96 * 1 + 1, 0.875 * 1 + 1], dtype=torch.float64)  # N <- rho N + 1
    v1 = torch.tensor([0.5 + 0.5 / n1[0], 0.5 - 0.5 / n1[1]], dtype=torch.float64)  # v + (r' - v) / N
    torch.testing.assert_close(tr.counts(keys), n1)
    torch.testing.assert_close(tr.value(keys), 2 * v1 - 1)
    # step 2: D = (0.006, 0): rho = (2^-0.1, 0.96); R = (-1, 1): r' = (0, 1)
    s2 = upstream_step(tr, keys, torch.tensor([-1.0, 1.0]), torch.tensor([0.006, 0.0]), eps=0.0)
    torch.testing.assert_close(s2.v_prev, 2 * v1 - 1)
    n2 = torch.tensor([2 ** -0.1 * n1[0] + 1, 0.96 * n1[1] + 1], dtype=torch.float64)
    v2 = torch.tensor([v1[0] - v1[0] / n2[0], v1[1] + (1 - v1[1]) / n2[1]], dtype=torch.float64)
    torch.testing.assert_close(tr.counts(keys), n2)
    torch.testing.assert_close(tr.value(keys), 2 * v2 - 1)
    alpha, beta = tr.beta_params(keys)
    torch.testing.assert_close(alpha + beta, n2)


def test_repeated_prompt_reads_same_pre_update_value():
    tr = ValueTracker(prior="first_observation")
    tr.observe(["q"], torch.tensor([0.5]), 0.0)
    step = upstream_step(tr, ["q", "q"], torch.tensor([1.0, -1.0]), 0.0, batch_norm=False)
    assert step.v_prev.tolist() == [0.5, 0.5] and step.advantages.tolist() == [0.5, -1.5]
    assert float(tr.counts(["q"])) == pytest.approx(0.96 * 1.96 + 1)  # two sequential updates
