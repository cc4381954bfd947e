"""TP/PP/DP invariance of the Megatron policy on CPU (gloo, 4 spawned ranks).

For Llama (untied, Llama-3 rope scaling) and Qwen2 (tied, qkv bias), every layout
(TP, PP) in {(1,1), (2,1), (1,2), (2,2)} on 4 ranks (so DP = 4, 2, 2, 1: the batch is also split
differently over data-parallel ranks and micro-batches) must give
  * the same token-normalised loss as TP=1/PP=1 to 1e-6 relative (and as transformers' fp32 model),
  * the same gradients, gathered to full HF-named tensors, to 1e-5,
  * the same weights after one clipped AdamW step, with Megatron's plain mixed-precision optimizer
    and with its distributed optimizer.
"""
from __future__ import annotations

import pytest
import torch

from mp_helpers import spawn
from tiny import hf_model, hf_policy_loss, hf_weights, policy_gradient_loss, rollout

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
WORLD = 4
LR = 1e-2


def _optim():
    from megatron_skpo.config.train import OptimConfig

    # adam_eps 1e-3: Adam's first update is lr * g / (|g| + eps); a larger eps keeps it a smooth
    # function of g, so 1e-7 gradient differences cannot flip the sign of a near-zero update.
    return OptimConfig(lr=LR, warmup_steps=0, weight_decay=0.1, adam_eps=1e-3, grad_clip=0.5)


def _micro_batches(dp_rank: int, dp: int):
    from megatron_skpo.model.packing import pack_sequences

    tokens, masks, adv = rollout()
    mine = [i for i in range(len(tokens)) if i % dp == dp_rank]
    return pack_sequences([tokens[i] for i in mine], [masks[i] for i in mine], budget=24,
                          token_values={"adv": [adv[i] for i in mine]})


def _worker(rank, world, arch, layouts):
    from megatron.core import parallel_state as ps

    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.model.train_step import build_policy, forward_backward, optimizer_step, train_step
    from megatron_skpo.model.train_step import zero_grads
    from megatron_skpo.model.weights import gather_hf

    model, hf_config = hf_model(arch)
    weights = hf_weights(model)
    results = {}
    for tp, pp in layouts:
        initialize_parallel(tp, pp, seed=1)
        mbs = _micro_batches(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        plain = build_policy(hf_config, _optim(), total_steps=10, distributed_optimizer=False,
                             hf_weights=weights, logprob_chunk=7)
        zero_grads(plain)
        stores = forward_backward(plain, mbs, policy_gradient_loss)
        grads = gather_hf(plain.model, hf_config, tensor_of=lambda p: p.main_grad)
        step = optimizer_step(plain)
        after_plain = gather_hf(plain.model, hf_config)
        sharded = build_policy(hf_config, _optim(), total_steps=10, distributed_optimizer=True,
                               hf_weights=weights, logprob_chunk=7)
        metrics = train_step(sharded, mbs, policy_gradient_loss)
        after_sharded = gather_hf(sharded.model, hf_config)
        if rank == 0:
            results[(tp, pp)] = dict(loss=metrics["loss"], grad_norm=step["grad_norm"],
                                     grad_norm_sharded=metrics["grad_norm"], grads=grads,
                                     plain=after_plain, sharded=after_sharded, n_stores=len(stores))
    return results


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp_pp_dp_invariance(arch):
    results = spawn(_worker, WORLD, arch, LAYOUTS, timeout=600)[0]
    ref = results[(1, 1)]
    model, _ = hf_model(arch)
    assert ref["loss"] == pytest.approx(hf_policy_loss(model), rel=1e-5)
    assert ref["grad_norm"] > 0.5, "grad clipping (at 0.5) should be active in this test"
    initial = hf_weights(model)
    moved = max((ref["plain"][k] - initial[k]).abs().max().item() for k in ref["plain"])
    assert moved > LR / 2, "the optimizer step should move the weights"
    for layout, got in results.items():
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), layout
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), layout
        assert got["grad_norm_sharded"] == pytest.approx(ref["grad_norm"], rel=1e-5), layout
        assert set(got["grads"]) == set(ref["grads"]) == set(got["plain"])
        for name in ref["grads"]:
            torch.testing.assert_close(got["grads"][name], ref["grads"][name], atol=1e-5, rtol=0,
                                       msg=lambda m: f"{layout} grad {name}: {m}")
            for kind in ("plain", "sharded"):
                torch.testing.assert_close(got[kind][name], ref["plain"][name], atol=1e-6, rtol=0,
                                           msg=lambda m: f"{layout} {kind} weights {name}: {m}")
