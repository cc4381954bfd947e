"""One-rank data-parallel collectives left out (megatron_skpo/model/single_rank.py): the same update
bit for bit, with both optimizers; groups of two ranks keep megatron-core's collectives. Also: the
CPU optimizer is torch's fused AdamW."""
from __future__ import annotations

import pytest
import torch

from mp_helpers import spawn
from tiny import hf_model, hf_weights, policy_gradient_loss, rollout


def _step(distributed_optimizer: bool, keep_collectives: bool, dp_rank: int = 0, dp: int = 1):
    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.packing import pack_sequences
    from megatron_skpo.model.train_step import build_policy, train_step
    from megatron_skpo.model.weights import gather_hf

    model, hf_config = hf_model("qwen2")
    policy = build_policy(hf_config, OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.5), total_steps=4,
                          distributed_optimizer=distributed_optimizer, hf_weights=hf_weights(model), logprob_chunk=7)
    groups = policy.model.bucket_groups
    inner = [o.optimizer for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])]
    assert all(g["fused"] for o in inner for g in o.param_groups)  # torch's fused CPU AdamW
    patched = sum("start_grad_sync" in vars(g) for g in groups)
    if keep_collectives:  # back to megatron-core's own methods
        for g in groups:
            vars(g).pop("start_grad_sync", None)
            vars(g).pop("start_param_sync", None)
    tokens, masks, adv = rollout()
    mine = [i for i in range(len(tokens)) if i % dp == dp_rank]
    mbs = pack_sequences([tokens[i] for i in mine], [masks[i] for i in mine], budget=24,
                         token_values={"adv": [adv[i] for i in mine]})
    metrics = [train_step(policy, mbs, policy_gradient_loss) for _ in range(2)]
    return patched, len(groups), metrics, gather_hf(policy.model, hf_config)


def _one_rank(rank, world):
    from megatron_skpo.model.builder import initialize_parallel

    initialize_parallel(1, 1, seed=1)
    return {(dist_opt, keep): _step(dist_opt, keep) for dist_opt in (False, True) for keep in (False, True)}


def _two_ranks(rank, world):
    from megatron_skpo.model.builder import initialize_parallel

    initialize_parallel(1, 1, seed=1)
    return _step(True, False, dp_rank=rank, dp=world)[:2]


@pytest.mark.distributed
def test_one_rank_skips_the_collectives_and_updates_identically():
    results = spawn(_one_rank, 1, timeout=300)[0]
    for dist_opt in (False, True):
        patched, n_groups, metrics, weights = results[(dist_opt, False)]
        _, _, ref_metrics, ref_weights = results[(dist_opt, True)]
        assert patched == n_groups > 0
        assert metrics == ref_metrics
        assert metrics[0]["grad_norm"] > 0.5  # clipped: the gradient scaling path is exercised
        for name, w in ref_weights.items():
            assert torch.equal(weights[name], w), name


@pytest.mark.distributed
def test_two_data_parallel_ranks_keep_the_collectives():
    for patched, n_groups in spawn(_two_ranks, 2, timeout=300):
        assert n_groups > 0 and patched == 0
