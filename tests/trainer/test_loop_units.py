"""Fast checks of the loop's glue on hand-built rollout batches (no engine, no model)."""
from __future__ import annotations

import pytest
import torch

from megatron_skpo.algo.advantages import AdvantageParams
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.rollout.types import RolloutBatch, Sample, SkpoRecord
from megatron_skpo.trainer.credit import CreditInput, credit_group, credit_skpo, mc_token_values
from megatron_skpo.trainer.objective import reduce_loss_metrics
from megatron_skpo.trainer.rows import mini_batches
from megatron_skpo.trainer.stages import is_timing_key, stream_seed


def row(prompt, resp, group, phase="single", finish="stop", parent=-1, position=-1, key=None):
    return Sample(list(prompt), list(resp), [-0.5] * len(resp), finish, group if key is None else key, group,
                  phase, parent=parent, position=position)


def group_batch() -> RolloutBatch:
    """Prompt 0: rewards (1, -1); prompt 1: (1, 1), a constant group; prompt 2: one truncated row."""
    return RolloutBatch([row([1, 2], [3, 4], 0), row([1, 2], [5], 0), row([7], [8, 9, 9], 1), row([7], [8], 1),
                         row([6, 6], [1, 1], 2, finish="length"), row([6, 6], [2], 2)])


def inp(batch, rewards, **kw) -> CreditInput:
    return CreditInput(batch, torch.tensor(rewards, dtype=torch.float64), "grpo", AdvantageParams(std_unbiased=False),
                       ValueTracker(), 0.0, **kw)


def test_group_credit_hand_worked_and_dynamic_sampling():
    cr = credit_group(inp(group_batch(), [1, -1, 1, 1, -1, 1], dynamic_sampling=True))
    # prompt 0: mean 0, population std 1 -> A = +1 / -1 on every response token
    assert torch.allclose(cr.advantages[0], torch.ones(2), atol=1e-5)
    assert torch.allclose(cr.advantages[1], -torch.ones(1), atol=1e-5)
    assert torch.equal(cr.advantages[2], torch.zeros(3))  # constant group -> exactly 0
    assert cr.dropped_rows == {2, 3}
    assert cr.metrics["adv/single/zero_group_rate"] == pytest.approx(1 / 3)
    assert cr.metrics["dynamic_sampling/dropped_groups"] == 1


def test_mini_batches_by_prompt_dp_split_and_overlong_filter():
    b = group_batch()
    adv = {i: torch.full((len(s.response_ids),), float(i)) for i, s in enumerate(b.samples)}
    minis = mini_batches(b, adv, dropped={2, 3}, num_prompts=3, prompts_per_mini_batch=2, dp_rank=0, dp_size=1,
                         overlong_filter=True)
    assert [m.rows for m in minis] == [[0, 1], [4, 5]]  # prompt 1 dropped; prompt 2 in the second update
    first = minis[0]
    assert first.tokens[0].tolist() == [1, 2, 3, 4] and first.loss_masks[0].tolist() == [0, 0, 1, 1]
    assert first.values["adv"][1].tolist() == [0, 0, 1] and first.values["sampler_logp"][1].tolist() == [0, 0, -0.5]
    assert minis[1].loss_masks[0].tolist() == [0, 0, 0, 0]  # truncated ("length"): no loss
    assert minis[1].counts("single") == (1, 1)
    rank1 = mini_batches(b, adv, set(), 3, 2, dp_rank=1, dp_size=2, overlong_filter=False)
    assert [m.rows for m in rank1] == [[2, 3], []]  # prompt i of a mini-batch goes to rank i mod DP


def test_skpo_credit_upstream_is_mean_of_downstream_and_tracker_order():
    q0 = [row([1], [2, 3], 0, "upstream", "cut")] + [row([4, 2, 3, 1], [5], 0, "downstream", parent=0)
                                                     for _ in range(2)]
    q1 = [row([9], [8], 1, "upstream", "cut")] + [row([4, 8, 9], [5, 5], 1, "downstream", parent=3) for _ in range(2)]
    recs = [SkpoRecord(0, 2, [2, 2], [False, False], [2, 2], [0.5, 0.5], 0, 0, [1, 2]),
            SkpoRecord(1, 1, [1, 1], [False, False], [1, 1], [0.5, 0.5], 0, 3, [4, 5])]
    batch = RolloutBatch(q0 + q1, recs)
    tracker = ValueTracker()
    tracker.observe([1], torch.tensor([1.0]), 0.0)  # V(q1) = 1 before the step
    from megatron_skpo.skpo.split import LengthTracker

    lengths = LengthTracker(10.0)
    cr = credit_skpo(CreditInput(batch, torch.tensor([0, 1, -1, 0, 1, 1.0], dtype=torch.float64), "grpo",
                                 AdvantageParams(std_unbiased=False), tracker, 0.0, length_tracker=lengths))
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


def test_metric_helpers():
    summed = {"loss|sum": 3.0, "loss|n": -2.0, "ratio|sum": 6.0, "ratio|n": 4.0, "empty|sum": 0.0, "empty|n": 0.0}
    assert reduce_loss_metrics(summed) == {"loss/loss": 3.0, "loss/ratio": 1.5}
    assert is_timing_key("time/rollout") and is_timing_key("perf/tokens_per_s") and not is_timing_key("reward")
    assert len({stream_seed(7, s, k) for s in range(50) for k in range(3)}) == 150
