"""Credit of each method family on hand-built rollout batches (no engine, no model)."""
from __future__ import annotations

import pytest
import torch

from megatron_skpo.algo.advantages import AdvantageParams
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.methods.base import CreditInput
from megatron_skpo.methods.common import CreditSettings
from megatron_skpo.methods.dense_mc import mc_token_values
from megatron_skpo.methods.group import group_credit
from megatron_skpo.rollout.types import RolloutBatch, Sample, SkpoRecord
from megatron_skpo.skpo.method import skpo_credit
from megatron_skpo.skpo.split import LengthTracker


def row(prompt, resp, group, phase="single", finish="stop", parent=-1, position=-1, key=None):
    return Sample(list(prompt), list(resp), [-0.5] * len(resp), finish, group if key is None else key, group,
                  phase, parent=parent, position=position)


def group_batch() -> RolloutBatch:
    """Prompt 0: rewards (1, -1); prompt 1: (1, 1), a constant group; prompt 2: one truncated row."""
    return RolloutBatch([row([1, 2], [3, 4], 0), row([1, 2], [5], 0), row([7], [8, 9, 9], 1), row([7], [8], 1),
                         row([6, 6], [1, 1], 2, finish="length"), row([6, 6], [2], 2)])


def settings(dynamic_sampling=False) -> CreditSettings:
    return CreditSettings("grpo", AdvantageParams(std_unbiased=False), dynamic_sampling)


def inp(batch, rewards, tracker=None) -> CreditInput:
    return CreditInput(batch, torch.tensor(rewards, dtype=torch.float64), tracker or ValueTracker(), {})


def test_group_credit_hand_worked_and_dynamic_sampling():
    cr = group_credit(settings(dynamic_sampling=True), inp(group_batch(), [1, -1, 1, 1, -1, 1]))
    # prompt 0: mean 0, population std 1 -> A = +1 / -1 on every response token
    assert torch.allclose(cr.advantages[0], torch.ones(2), atol=1e-5)
    assert torch.allclose(cr.advantages[1], -torch.ones(1), atol=1e-5)
    assert torch.equal(cr.advantages[2], torch.zeros(3))  # constant group -> exactly 0
    assert cr.dropped_rows == {2, 3}
    assert cr.metrics["adv/single/zero_group_rate"] == pytest.approx(1 / 3)
    assert cr.metrics["dynamic_sampling/dropped_groups"] == 1


def test_skpo_credit_upstream_is_mean_of_downstream_and_tracker_order():
    q0 = [row([1], [2, 3], 0, "upstream", "cut")] + [row([4, 2, 3, 1], [5], 0, "downstream", parent=0)
                                                     for _ in range(2)]
    q1 = [row([9], [8], 1, "upstream", "cut")] + [row([4, 8, 9], [5, 5], 1, "downstream", parent=3) for _ in range(2)]
    recs = [SkpoRecord(0, 2, [2, 2], [False, False], [2, 2], [0.5, 0.5], 0, 0, [1, 2]),
            SkpoRecord(1, 1, [1, 1], [False, False], [1, 1], [0.5, 0.5], 0, 3, [4, 5])]
    batch = RolloutBatch(q0 + q1, recs)
    tracker = ValueTracker(prior="first_observation")
    tracker.observe([1], torch.tensor([1.0]), 0.0)  # V(q1) = 1 before the step (the first observation sets V)
    lengths = LengthTracker(10.0)
    cr = skpo_credit(settings(), lengths, "segment_plus_downstream", "mc", inp(batch, [0, 1, -1, 0, 1, 1.0], tracker))
    # R_I = (0, 1); A = R_I - V_prev = (0 - 0, 1 - 1) = (0, 0): equal -> whitened to exactly 0
    assert cr.rewards[[0, 3]].tolist() == [0.0, 1.0]
    assert torch.equal(cr.advantages[0], torch.zeros(2)) and torch.equal(cr.advantages[3], torch.zeros(1))
    assert tracker.value([0]).item() == pytest.approx(0.0) and tracker.value([1]).item() == pytest.approx(1.0)
    assert torch.allclose(cr.advantages[1], torch.ones(1), atol=1e-5)  # downstream group (1, -1)
    assert lengths.lengths([0, 1]).tolist() == [3.0, 3.0]  # |s| + mean |o|: 2 + 1 and 1 + 2 (first obs)


def test_mc_token_values_piecewise_constant():
    base = row([1], [2, 3, 4, 5], 0)
    mc = [row([1], [9], 0, "mc", parent=0, position=0), row([1], [9], 0, "mc", parent=0, position=0),
          row([1, 2, 3], [9], 0, "mc", parent=0, position=2)]
    batch = RolloutBatch([base, *mc])
    values, starts = mc_token_values(batch, [0], torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64))
    assert values.tolist() == [[0.5, 0.5, -1.0, -1.0]]
    assert starts.tolist() == [[True, False, True, False]]
