"""PRIME's maths: the advantage (hand-worked and against a loop over the paper's equation), the process
reward normalisation, the accuracy filter, its credit on hand-built batches and the PRM's loss."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from megatron_skpo.algo.advantages import (AdvantageInput, AdvantageParams, compute_advantages,
                                           process_batch_norm)
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.methods.base import CreditInput
from megatron_skpo.methods.common import CreditSettings
from megatron_skpo.methods.prime import PRMSettings, accuracy_filter, prime_credit
from megatron_skpo.model.packing import pack_sequences, split_rows
from megatron_skpo.rollout.types import RolloutBatch, Sample
from megatron_skpo.trainer.prm import prm_loss_fn

PLAIN = AdvantageParams(eps=0.0, std_unbiased=False, process_coef=1.0, outcome_coef=1.0, process_norm="none")


def test_hand_worked_two_responses():
    """r = [[0.2, 0.4], [0, -0.2]], R = [1, 0]: process means 0.3 / -0.1, so the leave-one-out terms
    are [0.3, 0.5] / [-0.3, -0.5], returns [0.8, 0.5] / [-0.8, -0.5]; outcome LOO +1 / -1; sum
    [1.8, 1.5] / [-1.8, -1.5]; whitened over the 4 tokens (mean 0, population std sqrt(2.745))."""
    inp = AdvantageInput(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0]), torch.ones(2, 2),
                         process_rewards=torch.tensor([[0.2, 0.4], [0.0, -0.2]], dtype=torch.float64))
    sd = math.sqrt((1.8**2 + 1.5**2) / 2)
    want = torch.tensor([[1.8, 1.5], [-1.8, -1.5]], dtype=torch.float64) / sd
    torch.testing.assert_close(compute_advantages("prime", inp, PLAIN), want)


def test_coefficients_weigh_the_two_sources():
    """Process only (outcome_coef 0): returns [0.8, 0.5] / [-0.8, -0.5] whitened; outcome only: every
    token of a response the same, +1 / -1 after whitening."""
    inp = AdvantageInput(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0]), torch.ones(2, 2),
                         process_rewards=torch.tensor([[0.2, 0.4], [0.0, -0.2]], dtype=torch.float64))
    sd = math.sqrt((0.8**2 + 0.5**2) / 2)
    process = compute_advantages("prime", inp, replace(PLAIN, outcome_coef=0.0))
    torch.testing.assert_close(process, torch.tensor([[0.8, 0.5], [-0.8, -0.5]], dtype=torch.float64) / sd)
    outcome = compute_advantages("prime", inp, replace(PLAIN, process_coef=0.0))
    torch.testing.assert_close(outcome, torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64))


def test_process_batch_norm_hand_worked():
    """Returns-to-go [[0.6, 0.4], [-0.2, -0.2]]: the largest |.| is 0.6, every r_t is divided by it."""
    r = torch.tensor([[0.2, 0.4], [0.0, -0.2]], dtype=torch.float64)
    torch.testing.assert_close(process_batch_norm(r, torch.ones(2, 2)), r / (0.6 + 1e-6))
    masked = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # 0.4 is padding: max |togo| 0.2
    torch.testing.assert_close(process_batch_norm(r * masked, masked), r * masked / (0.2 + 1e-6))


def _loop_reference(rewards, groups, mask, process, p: AdvantageParams):
    """The paper's eq. 5 by loops: A_t^i = c_p sum_{s>=t} (r_s^i - mean_{j != i} rbar^j) + c_o (R^i - mean_{j != i} R^j)."""
    B, T = mask.shape
    valid = [[bool(mask[b, t]) for t in range(T)] for b in range(B)]
    r = [[float(process[b, t]) if valid[b][t] else 0.0 for t in range(T)] for b in range(B)]
    if p.process_norm == "batch_norm":
        biggest = max(abs(sum(r[b][t:])) for b in range(B) for t in range(T))
        r = [[x / (biggest + 1e-6) for x in row] for row in r]
    rbar = [sum(r[b]) / max(sum(valid[b]), 1) for b in range(B)]
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        peers = [j for j in range(B) if groups[j] == groups[i] and j != i]
        base_r = sum(rbar[j] for j in peers) / len(peers) if peers else 0.0
        base_o = sum(float(rewards[j]) for j in peers) / len(peers) if peers else 0.0
        for t in range(T):
            if valid[i][t]:
                togo = sum(r[i][s] - base_r for s in range(t, T) if valid[i][s])
                adv[i][t] = p.process_coef * togo + p.outcome_coef * (float(rewards[i]) - base_o)
    flat = [adv[b][t] for b in range(B) for t in range(T) if valid[b][t]]
    mu = sum(flat) / len(flat)
    n = len(flat) - (1 if p.std_unbiased else 0)
    sd = math.sqrt(sum((x - mu) ** 2 for x in flat) / n)
    return torch.tensor([[(adv[b][t] - mu) / (sd + p.eps) if valid[b][t] else 0.0 for t in range(T)]
                         for b in range(B)], dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm", ["batch_norm", "none"])
def test_matches_the_papers_equation_by_loops(seed, norm):
    g = torch.Generator().manual_seed(seed)
    b, t = 12, 6
    groups = torch.tensor([5, 5, 5, 5, 9, 9, 9, 9, 2, 2, 2, 2])[torch.randperm(b, generator=g)]
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    rewards = torch.randint(0, 2, (b,), generator=g).double()
    process = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.1
    params = AdvantageParams(process_norm=norm)
    got = compute_advantages("prime", AdvantageInput(rewards, groups, mask, process_rewards=process), params)
    torch.testing.assert_close(got, _loop_reference(rewards, groups.tolist(), mask, process, params))


def test_needs_process_rewards():
    with pytest.raises(ValueError, match="process_rewards"):
        compute_advantages("prime", AdvantageInput(torch.ones(2), torch.tensor([0, 0]), torch.ones(2, 1)), PLAIN)


def test_accuracy_filter_bounds_are_inclusive():
    """Group 0: 4/4 correct (1.0, out); group 1: 1/4 (0.25, in); group 2: 1/5 = 0.2 (in, the bound);
    group 3: 0/3 (out); group 4: 4/5 = 0.8 (in, the bound)."""
    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 5 + [3] * 3 + [4] * 5)
    correct = torch.tensor([1, 1, 1, 1] + [1, 0, 0, 0] + [0, 0, 1, 0, 0] + [0, 0, 0] + [1, 1, 0, 1, 1]).bool()
    keep = accuracy_filter(groups, correct, 0.2, 0.8)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [True] * 5 + [False] * 3 + [True] * 5
    assert accuracy_filter(groups, correct, 0.0, 1.0).all()


def _batch() -> RolloutBatch:
    """Two prompts x G = 2: prompt 0 one right, one wrong (kept); prompt 1 both right (filtered)."""
    def s(group, resp):
        return Sample([1, 2], list(resp), [-0.5] * len(resp), "stop", group, group, "single")
    return RolloutBatch([s(0, [3, 4]), s(0, [5, 6, 7]), s(1, [8]), s(1, [9, 9])])


def test_credit_filters_then_uses_both_rewards():
    settings = CreditSettings("prime", PLAIN)
    prm = PRMSettings(accuracy_lower=0.2, accuracy_upper=0.8)
    process = {0: torch.tensor([0.2, 0.4]), 1: torch.tensor([0.0, -0.2, 0.1])}
    inp = CreditInput(_batch(), torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), ValueTracker(), {},
                      torch.tensor([True, False, True, True]), process)
    cr = prime_credit(settings, prm, inp)
    assert cr.dropped_rows == {2, 3} and sorted(cr.advantages) == [0, 1]
    assert cr.metrics["prime/filtered_groups"] == 1 and cr.metrics["prime/kept_group_rate"] == 0.5
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    padded = torch.tensor([[0.2, 0.4, 0.0], [0.0, -0.2, 0.1]], dtype=torch.float64)
    want = _loop_reference(torch.tensor([1.0, 0.0]), [0, 0], mask, padded, PLAIN)
    torch.testing.assert_close(cr.advantages[0].double(), want[0, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(cr.advantages[1].double(), want[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no process rewards for rows \\[1\\]"):
        prime_credit(settings, prm, replace(inp, process_rewards={0: process[0]}))
    with pytest.raises(ValueError, match="verdicts"):
        prime_credit(settings, prm, replace(inp, correct=None))


def test_credit_with_every_group_filtered_trains_nothing():
    inp = CreditInput(_batch(), torch.ones(4, dtype=torch.float64), ValueTracker(), {}, torch.ones(4, dtype=torch.bool))
    cr = prime_credit(CreditSettings("prime", PLAIN), PRMSettings(), inp)
    assert cr.advantages == {} and cr.dropped_rows == {0, 1, 2, 3}


def test_prm_loss_is_the_cross_entropy_of_the_implicit_outcome():
    """Two responses (labels 1 and 0): logit = beta * sum over the response of (log pi_prm - log pi_ref);
    the loss is the mean BCE over the ``num_rows`` responses of the mini-batch (here 4: two ranks),
    and the forward's log-probs are kept as ``prm_logp``."""
    tokens = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 5, 6])]
    masks = [torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])]
    labels = [m.clone() for m in masks]
    labels[1].zero_()
    (mb,) = pack_sequences(tokens, masks, 64, {"label": labels})
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(mb.num_tokens, generator=g)).requires_grad_()
    mb.token_values["ref_logp"] = -torch.rand(mb.num_tokens, generator=g)
    beta = 0.05
    loss, metrics = prm_loss_fn(beta, num_rows=4.0)(logp, torch.zeros(mb.num_tokens), mb)
    m = split_rows(mb.loss_mask, mb)
    ratio = split_rows(logp.detach(), mb) - split_rows(mb.token_values["ref_logp"], mb)
    logits = beta * (ratio * m).sum(1)
    assert (m.sum(1) == torch.tensor([2.0, 2.0])).all()
    want = (-torch.nn.functional.logsigmoid(logits[0]) - torch.nn.functional.logsigmoid(-logits[1])) / 4
    torch.testing.assert_close(loss.detach(), want)
    assert torch.equal(mb.token_values["prm_logp"], logp.detach())
    assert float(metrics["loss|n"]) == 2 and float(metrics["accuracy|n"]) == 2
    loss.backward()
    grad = split_rows(logp.grad, mb)
    # raising the right response's log-probs lowers the loss, raising the wrong one's raises it
    assert (grad[0][m[0] > 0] < 0).all() and (grad[1][m[1] > 0] > 0).all()
    assert torch.equal(grad[m == 0], torch.zeros_like(grad[m == 0]))
