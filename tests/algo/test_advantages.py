"""Advantage estimators: hand-worked values, loop references, and group properties."""
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.algo.advantages import (AdvantageInput, AdvantageParams, batch_normalize,
                                           compute_advantages, group_stats)
from megatron_skpo.algo.registries import ADVANTAGES

GROUP_ESTIMATORS = ["grpo", "dr_grpo", "rloo"]
P = AdvantageParams()


def _inp(rewards, groups, mask=None, **kw):
    r = torch.tensor(rewards, dtype=torch.float64)
    m = torch.ones(len(rewards), 3) if mask is None else torch.as_tensor(mask)
    return AdvantageInput(r, torch.tensor(groups), m, **kw)


def _random_inp(seed, b=24, t=7, discrete=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([7, 3, 100, 42, -5])[torch.randint(0, 5, (b,), generator=g)]
    r = (torch.randint(0, 2, (b,), generator=g) * 2 - 1).double() if discrete else torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    offset = torch.randint(0, 2, (b,), generator=g)  # responses need not start at column 0
    cols = torch.arange(t + 1)[None, :]
    mask = ((cols >= offset[:, None]) & (cols < offset[:, None] + lengths[:, None])).long()
    values = torch.rand(b, t + 1, generator=g, dtype=torch.float64) * 2 - 1
    starts = torch.rand(b, t + 1, generator=g) < 0.3
    return AdvantageInput(r, ids, mask, baseline=torch.rand(b, generator=g, dtype=torch.float64),
                          token_values=values, value_starts=starts)


def _std(xs, unbiased):
    return statistics.stdev(xs) if unbiased else statistics.pstdev(xs)


def _whiten_ref(xs, eps, unbiased):
    if len(xs) <= 1 or max(xs) == min(xs):
        return [0.0] * len(xs)
    mu, sd = statistics.fmean(xs), _std(xs, unbiased)
    return [(x - mu) / (sd + eps) for x in xs]


def _seq_ref(name, inp, params):
    """Per-row advantage by explicit loops over each row's group."""
    r, gid = inp.rewards.tolist(), inp.group_index.tolist()
    out = []
    for i, ri in enumerate(r):
        vals = [r[j] for j in range(len(r)) if gid[j] == gid[i]]
        n, mu = len(vals), statistics.fmean(vals)
        if n == 1 or max(vals) == min(vals):
            out.append(0.0)
        elif name == "grpo":
            out.append((ri - mu) / (_std(vals, params.std_unbiased) + params.eps))
        elif name == "dr_grpo":
            out.append(ri - mu)
        else:  # rloo
            out.append(ri - (sum(vals) - ri) / (n - 1))
    return out


def _tokens_ref(seq, inp):
    return torch.tensor(seq, dtype=torch.float64)[:, None] * inp.mask


def _token_whiten_ref(adv, mask, params):
    flat = [adv[b][t] for b in range(len(adv)) for t in range(len(adv[0])) if mask[b][t]]
    w = iter(_whiten_ref(flat, params.eps, params.std_unbiased))
    return [[next(w) if mask[b][t] else 0.0 for t in range(len(adv[0]))] for b in range(len(adv))]


def _dense_ref(inp, params):
    """dense_mc by loops: compact each row, after-values, then vine steps or relative group norm."""
    mask, V, R, gid = inp.response_mask.tolist(), inp.token_values.tolist(), inp.rewards.tolist(), inp.group_index.tolist()
    B, T = len(mask), len(mask[0])
    cols = [[t for t in range(T) if mask[b][t]] for b in range(B)]
    vals = [[V[b][t] for t in cols[b]] for b in range(B)]
    after = [vals[b][1:] + [R[b]] for b in range(B)]
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = len(cols[b])
        if params.dense_mode == "vine":
            d = [after[b][k] - vals[b][k] for k in range(L)]
            starts = [True] + [bool(inp.value_starts[b, cols[b][k]]) for k in range(1, L)]
            k = 0
            while k < L:
                e = k + 1
                while e < L and not starts[e]:
                    e += 1
                for j in range(k, e):
                    out[b][cols[b][j]] = sum(d[k:e])
                k = e
            continue
        peers = [j for j in range(B) if gid[j] == gid[b] and cols[j]]
        for k in range(L):
            idx = {j: (len(cols[j]) - 1 if L == 1 else k * (len(cols[j]) - 1) // (L - 1)) for j in peers}
            xs = [after[j][idx[j]] for j in peers]
            if max(xs) == min(xs):
                continue
            out[b][cols[b][k]] = (after[b][k] - statistics.fmean(xs)) / (_std(xs, params.std_unbiased) + params.eps)
    return torch.tensor(out, dtype=torch.float64)


# G = 4, rewards [1, -1, -1, 1]: mean 0; unbiased std sqrt(4/3); population std 1.
@pytest.mark.parametrize("name,params,expected", [
    ("grpo", P, math.sqrt(3) / 2 / (1 + 1e-6 * math.sqrt(3) / 2)),  # 1 / (sqrt(4/3) + eps)
    ("grpo", AdvantageParams(std_unbiased=False), 1 / (1 + 1e-6)),
    ("dr_grpo", P, 1.0),
    ("rloo", P, 4 / 3),  # 1 - mean(-1, -1, 1) = 1 + 1/3
    ("reinforce_pp", P, 1 / (math.sqrt(12 / 11) + 1e-6)),  # 12 tokens of +-1, unbiased std
    ("reinforce_pp_baseline", P, 1 / (math.sqrt(12 / 11) + 1e-6)),
], ids=["grpo", "grpo-pop-std", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_hand_values_g4(name, params, expected):
    adv = compute_advantages(name, _inp([1, -1, -1, 1], [5, 5, 5, 5]), params)
    want = torch.tensor([1, -1, -1, 1], dtype=torch.float64)[:, None] * expected
    torch.testing.assert_close(adv, want.expand(4, 3), rtol=1e-12, atol=1e-12)


def test_spo_hand_values():
    # A = R - baseline = [0.5, -0.5, 1.5]; mean 0.5; dev [0, -1, 1]; unbiased std 1.
    inp = _inp([1.0, 0.0, 1.0], [0, 1, 2], [[1, 1, 0], [1, 0, 0], [1, 1, 1]],
               baseline=torch.tensor([0.5, 0.5, -0.5], dtype=torch.float64))
    want = torch.tensor([[0, 0, 0], [-1, 0, 0], [1, 1, 1]], dtype=torch.float64) / (1 + 1e-6)
    torch.testing.assert_close(compute_advantages("spo", inp, P), want)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_estimators_match_loop(name, seed, unbiased):
    params = AdvantageParams(std_unbiased=unbiased)
    inp = _random_inp(seed, discrete=seed % 2 == 0)
    want = _tokens_ref(_seq_ref(name, inp, params), inp)
    torch.testing.assert_close(compute_advantages(name, inp, params), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_reinforce_pp_and_spo_match_loop(seed):
    inp = _random_inp(seed, discrete=False)
    m = inp.response_mask.tolist()
    bcast = _tokens_ref(inp.rewards.tolist(), inp).tolist()
    torch.testing.assert_close(compute_advantages("reinforce_pp", inp, P),
                               torch.tensor(_token_whiten_ref(bcast, m, P), dtype=torch.float64))
    centred = _tokens_ref(_seq_ref("dr_grpo", inp, P), inp).tolist()
    torch.testing.assert_close(compute_advantages("reinforce_pp_baseline", inp, P),
                               torch.tensor(_token_whiten_ref(centred, m, P), dtype=torch.float64))
    seq = _whiten_ref((inp.rewards - inp.baseline).tolist(), P.eps, True)
    torch.testing.assert_close(compute_advantages("spo", inp, P), _tokens_ref(seq, inp))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["group_norm", "vine"])
def test_dense_mc_matches_loop(seed, mode):
    params = AdvantageParams(dense_mode=mode, std_unbiased=seed % 2 == 0)
    inp = _random_inp(seed, discrete=False)
    torch.testing.assert_close(compute_advantages("dense_mc", inp, params), _dense_ref(inp, params),
                               rtol=1e-10, atol=1e-10)


def test_dense_mc_hand_values():
    # Row 0: V = [0.2, 0.6], R = 1 -> vine A = [0.4, 0.4]; row 1: V = [0.5], R = -1 -> A = [-1.5].
    inp = _inp([1.0, -1.0], [0, 0], [[1, 1], [1, 0]],
               token_values=torch.tensor([[0.2, 0.6], [0.5, 9.0]], dtype=torch.float64))
    vine = compute_advantages("dense_mc", inp, AdvantageParams(dense_mode="vine"))
    torch.testing.assert_close(vine, torch.tensor([[0.4, 0.4], [-1.5, 0.0]], dtype=torch.float64))
    # group_norm, after-values: row 0 [0.6, 1], row 1 [-1]. Row 1 (L=1) maps to row 0's last token;
    # row 0 token 0 vs -1 (0.6 > -1), token 1 vs -1: two-sample whitening gives +-1/sqrt(2).
    s = 1 / (math.sqrt(2) + 1e-6 * 1)  # |dev| / (std + eps) with |dev| = std / sqrt(2)
    gn = compute_advantages("dense_mc", inp, P)
    torch.testing.assert_close(gn[0], torch.tensor([s, s], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(gn[1, 0], torch.tensor(-s, dtype=torch.float64), rtol=1e-5, atol=0)


def test_dense_mc_last_token_is_grpo_and_vine_telescopes():
    inp = _random_inp(11, discrete=False)
    gn = compute_advantages("dense_mc", inp, P)
    grpo = compute_advantages("grpo", inp, P)
    last = inp.response_mask.long().cumsum(1).argmax(1)  # column of each row's last response token
    rows = torch.arange(len(last))
    torch.testing.assert_close(gn[rows, last], grpo[rows, last])
    vine = compute_advantages("dense_mc", AdvantageInput(inp.rewards, inp.group_index, inp.response_mask,
                                                         token_values=inp.token_values),
                              AdvantageParams(dense_mode="vine"))
    first = inp.response_mask.long().argmax(1)
    torch.testing.assert_close(vine.sum(1), inp.rewards - inp.token_values[rows, first])


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_group_advantages_sum_to_zero(name):
    inp = _random_inp(3, discrete=False)
    seq = compute_advantages(name, inp, P)[torch.arange(24), inp.response_mask.argmax(1)]
    sums = torch.zeros(201, dtype=torch.float64).index_add_(0, inp.group_index + 5, seq)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", GROUP_ESTIMATORS + ["dense_mc"])
def test_constant_and_singleton_groups_give_exact_zero(name):
    # 0.1 * 3 / 3 != 0.1 in floating point: only an exact constancy check returns 0.
    inp = _inp([0.1, 0.1, 0.1, 0.7], [2, 2, 2, 9], token_values=torch.full((4, 3), 0.3, dtype=torch.float64))
    adv = compute_advantages(name, inp, P)
    assert torch.equal(adv, torch.zeros_like(adv))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(
    GROUP_ESTIMATORS + ["reinforce_pp", "reinforce_pp_baseline", "spo", "dense_mc"]))
def test_row_permutation_invariance(seed, name):
    inp = _random_inp(seed, b=10, discrete=seed % 2 == 0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
    permuted = AdvantageInput(inp.rewards[perm], inp.group_index[perm], inp.response_mask[perm],
                              inp.baseline[perm], inp.token_values[perm], inp.value_starts[perm])
    for mode in ("group_norm", "vine"):
        params = AdvantageParams(dense_mode=mode)
        torch.testing.assert_close(compute_advantages(name, permuted, params),
                                   compute_advantages(name, inp, params)[perm])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batch_norm_switch(level):
    inp = _random_inp(5, discrete=False)
    params = AdvantageParams(batch_norm=True, batch_norm_level=level)
    adv = compute_advantages("dr_grpo", inp, params)
    m = inp.response_mask.bool()
    assert torch.equal(adv[~m], torch.zeros_like(adv[~m]))
    stats = adv[m] if level == "token" else adv.sum(1) / m.sum(1)  # per-sequence means for "sequence"
    assert abs(float(stats.mean())) < 1e-9 and abs(float(stats.std()) - 1) < 1e-5
    assert not torch.allclose(compute_advantages("dr_grpo", inp, P), adv)


def test_batch_normalize_degenerate_batches():
    one = batch_normalize(torch.tensor([[2.0, 2.0]]), torch.ones(1, 2), "sequence", 1e-6)
    assert torch.equal(one, torch.zeros(1, 2))
    same = batch_normalize(torch.full((3, 2), 0.1), torch.ones(3, 2), "token", 1e-6)
    assert torch.equal(same, torch.zeros(3, 2))


def test_group_stats_noncontiguous_ids():
    st_ = group_stats(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([100, 100, -1]))
    torch.testing.assert_close(st_.mean, torch.tensor([2.0, 2.0, 10.0]))
    torch.testing.assert_close(st_.std, torch.tensor([math.sqrt(2), math.sqrt(2), 0.0]))
    assert st_.constant.tolist() == [False, False, True]


def test_registry_and_errors():
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "spo", "dense_mc"} <= set(ADVANTAGES.names())
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGES.register("grpo")(lambda inp, params: inp.rewards)
    with pytest.raises(KeyError, match="unknown advantage estimator 'nope'"):
        compute_advantages("nope", _inp([1.0], [0]), P)
    with pytest.raises(ValueError, match="baseline"):
        compute_advantages("spo", _inp([1.0], [0]), P)
    with pytest.raises(ValueError, match="token_values"):
        compute_advantages("dense_mc", _inp([1.0], [0]), P)
    with pytest.raises(ValueError, match="group_index"):
        AdvantageInput(torch.ones(2), torch.ones(3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_values"):
        _inp([1.0, 2.0], [0, 0], token_values=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="dense_mode"):
        AdvantageParams(dense_mode="gae")
