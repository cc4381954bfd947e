"""Fast checks of the loop's glue on hand-built rollout batches (no engine, no model)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_skpo.rollout.types import RolloutBatch, Sample
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


def test_metric_helpers():
    summed = {"loss|sum": 3.0, "loss|n": -2.0, "ratio|sum": 6.0, "ratio|n": 4.0, "empty|sum": 0.0, "empty|n": 0.0}
    assert reduce_loss_metrics(summed) == {"loss/loss": 3.0, "loss/ratio": 1.5}
    assert is_timing_key("time/rollout") and is_timing_key("perf/tokens_per_s") and not is_timing_key("reward")
    assert len({stream_seed(7, s, k) for s in range(50) for k in range(3)}) == 150


def versioned_batch(versions) -> RolloutBatch:
    b = group_batch()
    for s, v in zip(b.samples, versions):
        s.version = v
    return b


def test_mini_batches_mark_stale_rows_only_when_there_are_some():
    """Rows of the trainer's version: the synchronous values exactly; a stale row: its staleness on
    its trained tokens (the off-policy correction's switch)."""
    adv = {i: torch.full((len(s.response_ids),), 1.0) for i, s in enumerate(group_batch().samples)}
    plain = mini_batches(group_batch(), adv, set(), 3, 3, 0, 1, False)
    fresh = mini_batches(versioned_batch([4] * 6), adv, set(), 3, 3, 0, 1, False, policy_version=4)
    assert [set(m.values) for m in fresh] == [{"adv", "sampler_logp"}]
    assert all(torch.equal(a, b) for k in ("adv", "sampler_logp")
               for a, b in zip(plain[0].values[k], fresh[0].values[k]))
    stale = mini_batches(versioned_batch([4, 2, 4, 4, 4, 4]), adv, set(), 3, 3, 0, 1, False, policy_version=4)
    assert stale[0].values["stale"][1].tolist() == [0, 0, 2] and stale[0].values["stale"][0].tolist() == [0, 0, 0, 0]


def _loss(versions, mu_shift: float, off_policy: str, policy_version: int = 4) -> float:
    """PPO-clip token-mean loss of the group batch with A = 1 everywhere, log pi_theta = log pi_old = -0.5
    (ratio 1), the sampler's log-probs shifted by ``mu_shift``."""
    from megatron_skpo.algo.objective import ObjectiveSettings, PhaseLoss
    from megatron_skpo.trainer.objective import global_counts, make_loss_fn
    from megatron_skpo.trainer.rows import pack

    b = versioned_batch(versions)
    for s in b.samples:
        s.logprobs = [-0.5 - mu_shift] * len(s.response_ids)
    adv = {i: torch.full((len(s.response_ids),), 1.0) for i, s in enumerate(b.samples)}
    (rows,) = mini_batches(b, adv, set(), 3, 3, 0, 1, False, policy_version=policy_version)
    phases = (PhaseLoss("single", "ppo_clip", "token-mean"),)
    (mb,) = pack(rows, 512)
    mb.token_values["old_logp"] = torch.full_like(mb.loss_mask, -0.5)
    logp = torch.full_like(mb.loss_mask, -0.5, dtype=torch.float64).requires_grad_(True)
    loss_fn = make_loss_fn(rows, global_counts(rows, phases), phases, ObjectiveSettings(off_policy=off_policy))
    loss, _ = loss_fn(logp, torch.zeros_like(logp), mb)
    return float(loss.detach())


def test_loss_of_stale_rows_decoupled_and_behaviour():
    """Hand-worked: with ratio 1 and A = 1 the PPO token-mean loss is -1. Decoupled weighs stale tokens
    by pi_prox / mu (2 here; capped at 5), behaviour takes the ratio to mu (2, clipped to 1.28)."""
    assert _loss([4] * 6, 0.0, "decoupled") == pytest.approx(-1.0)
    assert _loss([4] * 6, math.log(2), "decoupled") == pytest.approx(-1.0)  # fresh rows: no weight (TIS off)
    assert _loss([3] * 6, math.log(2), "decoupled") == pytest.approx(-2.0)
    assert _loss([3] * 6, math.log(20), "decoupled") == pytest.approx(-5.0)  # capped
    assert _loss([3] * 6, math.log(2), "behaviour") == pytest.approx(-1.28)
    # one stale row of 1 token among 10 trained tokens: (9 x 1 + 1 x 2) / 10
    assert _loss([4, 3, 4, 4, 4, 4], math.log(2), "decoupled") == pytest.approx(-(9 + 2) / 10)
