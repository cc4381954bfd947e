"""Fast checks of the loop's glue on hand-built rollout batches (no engine, no model)."""
from __future__ import annotations

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
