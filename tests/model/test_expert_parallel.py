"""Expert-parallel invariance of the Qwen3-MoE policy on CPU (gloo, 4 spawned ranks, TP=1).

Experts split over EP = 2 or 4 data-parallel ranks (tokens travel by all-to-all) must give, against
EP=1 at the same PP (hence the same data-parallel split and micro-batches, which the
load-balancing loss, a per-micro-batch statistic, depends on):
  * the same loss and grad norm to 1e-5 relative and the same gradients (gathered to full
    HF-named tensors) to 1e-5, the load-balancing loss included (coefficient 0.01). (Measured:
    loss 1.3e-6 relative, gradients 4.5e-8: at EP > 1 each expert's GEMM sees the tokens of
    several ranks at once, which rounds differently in fp32.);
  * the same weights after one clipped AdamW step, plain and distributed optimizer;
  * the same routing statistics and old-policy log-probs (forward-only).
The data-parallel ranks get different numbers of micro-batches (checked): with EP > 1 the short
ones run filler micro-batches so that the all-to-alls pair up. The policy loss itself (without
the aux loss) equals transformers' at every layout, PP=2 included.
"""
from __future__ import annotations

import pytest
import torch

from mp_helpers import spawn
from tiny import hf_model, hf_policy_loss, hf_weights, policy_gradient_loss, rollout

LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)]  # (pp, ep); tp = 1: see test_moe_step's TP guard
WORLD = 4
LR = 1e-2
AUX = dict(output_router_logits=True, router_aux_loss_coef=0.01)


def _optim():
    from megatron_skpo.config.train import OptimConfig

    return OptimConfig(lr=LR, warmup_steps=0, weight_decay=0.1, adam_eps=1e-3, grad_clip=0.5)


def _micro_batches(dp_rank: int, dp: int):
    """This data-parallel rank's packed micro-batches, and the global index of each sequence in them."""
    from megatron_skpo.model.packing import pack_sequences

    tokens, masks, adv = rollout(7)
    mine = [i for i in range(len(tokens)) if i % dp == dp_rank]
    mbs = pack_sequences([tokens[i] for i in mine], [masks[i] for i in mine], budget=24,
                         token_values={"adv": [adv[i] for i in mine]})
    return mbs, [[mine[j] for j in mb.seq_index] for mb in mbs]


def _worker(rank, world, layouts):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.model.train_step import (build_policy, forward_backward, forward_logprobs, moe_metrics,
                                                optimizer_step, train_step, zero_grads)
    from megatron_skpo.model.weights import gather_hf

    model, hf_config = hf_model("qwen3_moe", **AUX)
    weights = hf_weights(model)
    results = {}
    for pp, ep in layouts:
        initialize_parallel(1, pp, seed=1, ep=ep)
        mbs, seqs = _micro_batches(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        counts = [None] * world
        dist.all_gather_object(counts, len(mbs))
        plain = build_policy(hf_config, _optim(), total_steps=10, distributed_optimizer=False,
                             hf_weights=weights, logprob_chunk=7)
        zero_grads(plain)
        stores = forward_backward(plain, mbs, policy_gradient_loss)
        grads = gather_hf(plain.model, hf_config, tensor_of=lambda p: p.main_grad)
        routing = moe_metrics(plain, per_expert=True)
        step = optimizer_step(plain)
        after_plain = gather_hf(plain.model, hf_config)
        old = forward_logprobs(plain, mbs)
        sharded = build_policy(hf_config, _optim(), total_steps=10, distributed_optimizer=True,
                               hf_weights=weights, logprob_chunk=7)
        metrics = train_step(sharded, mbs, policy_gradient_loss)
        after_sharded = gather_hf(sharded.model, hf_config)
        mine = {"logp": torch.cat([lp for lp, _ in old]), "seqs": seqs}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            results[(pp, ep)] = dict(loss=metrics["loss"], grad_norm=step["grad_norm"],
                                     grad_norm_sharded=metrics["grad_norm"], grads=grads, plain=after_plain,
                                     sharded=after_sharded, routing=routing, counts=counts,
                                     moe_in_train_step=metrics.get("moe/tokens_routed"),
                                     last_stage_stores=len(stores), logp=_logp_by_sequence(everyone))
    return results


def _logp_by_sequence(everyone) -> dict[int, torch.Tensor]:
    """Every rank's packed old log-probs, cut back into the 7 sequences."""
    tokens, _, _ = rollout(7)
    out = {}
    for part in everyone:
        flat, offset = part["logp"], 0
        for seqs in part["seqs"]:
            for i in seqs:
                out[i] = flat[offset: offset + len(tokens[i])]
                offset += len(tokens[i])
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, WORLD, LAYOUTS, timeout=900)[0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("pp,ep", [lay for lay in LAYOUTS if lay[1] > 1])
def test_expert_parallel_matches_ep1(results, pp, ep):
    ref, got = results[(pp, 1)], results[(pp, ep)]
    assert len(set(got["counts"])) > 1, "data-parallel ranks should hold different micro-batch counts"
    if pp == 1:  # rank 0 is a last stage: one store per real micro-batch, fillers dropped
        assert got["last_stage_stores"] == got["counts"][0]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["grad_norm_sharded"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["routing"] == ref["routing"] and got["moe_in_train_step"] == ref["routing"]["moe/tokens_routed"]
    assert set(got["grads"]) == set(ref["grads"]) == set(got["plain"])
    for name in ref["grads"]:
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], atol=1e-5, rtol=0,
                                   msg=lambda m: f"EP={ep} grad {name}: {m}")
        for kind in ("plain", "sharded"):
            torch.testing.assert_close(got[kind][name], ref["plain"][name], atol=1e-6, rtol=0,
                                       msg=lambda m: f"EP={ep} {kind} weights {name}: {m}")
    assert sorted(got["logp"]) == list(range(7))
    for i, logp in ref["logp"].items():
        torch.testing.assert_close(got["logp"][i], logp, atol=1e-6, rtol=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_policy_loss_matches_transformers_at_every_layout(results):
    model, _ = hf_model("qwen3_moe", **AUX)
    want = hf_policy_loss(model, rollout(7))
    for layout, got in results.items():
        assert got["loss"] == pytest.approx(want, rel=1e-5), layout
    ref = results[(1, 1)]
    assert ref["grad_norm"] > 0.5, "grad clipping (at 0.5) should be active in this test"
    initial = hf_weights(model)
    assert max((ref["plain"][k] - initial[k]).abs().max().item() for k in initial) > LR / 2
    # the aux loss depends on the micro-batches: PP=2 (DP=2) and PP=1 (DP=4) split them differently
    assert results[(2, 1)]["routing"]["moe/tokens_routed"] == ref["routing"]["moe/tokens_routed"]
