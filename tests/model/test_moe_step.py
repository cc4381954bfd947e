"""The MoE training step on one rank: the load-balancing loss against transformers' own, the router
statistics against transformers' routing, and the TP > 1 guard.

Aux loss: a 1-layer Qwen3-MoE with ``output_router_logits`` (HF then adds
``router_aux_loss_coef * load_balancing_loss_func``). Our step over several packed micro-batches
must add the token-weighted mean of HF's loss over the micro-batches (HF's loss of a micro-batch
= the loss of its tokens, each sequence run alone). Compared through the gradients: (gradients
with the coefficient) - (gradients with ``moe_aux_loss_coef=0``) = gradient of that HF loss.
"""
from __future__ import annotations

import pytest
import torch

from mp_helpers import spawn
from tiny import MOE, hf_grads, hf_model, hf_weights, policy_gradient_loss, rollout

COEF = 0.1
BUDGET = 40  # several micro-batches of unequal size


def _micro_batches():
    from megatron_skpo.model.packing import pack_sequences

    tokens, masks, adv = rollout(6)
    return pack_sequences(tokens, masks, budget=BUDGET, token_values={"adv": adv})


def _step_grads(rank, world):
    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.model.train_step import build_policy, forward_backward, moe_metrics, zero_grads
    from megatron_skpo.model.weights import gather_hf

    hf, cfg = hf_model("qwen3_moe", num_hidden_layers=1, output_router_logits=True, router_aux_loss_coef=COEF)
    initialize_parallel(1, 1, seed=1)
    mbs = _micro_batches()
    out = {"seqs": [mb.seq_index for mb in mbs]}
    for name, coef in (("with", None), ("without", 0.0)):
        policy = build_policy(cfg, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=2, hf_weights=hf_weights(hf),
                              distributed_optimizer=False, moe_aux_loss_coef=coef)
        zero_grads(policy)
        stores = forward_backward(policy, mbs, policy_gradient_loss)
        out[name] = dict(grads=gather_hf(policy.model, cfg, tensor_of=lambda p: p.main_grad),
                         loss=sum(float(s["loss"]) for s in stores), coeff=policy.gpt.config.moe_aux_loss_coeff,
                         stats=moe_metrics(policy, per_expert=True), again=moe_metrics(policy))
    return out


@pytest.fixture(scope="module")
def step():
    return spawn(_step_grads, 1)[0]


def _hf_router_logits(hf, seq):
    return hf(seq[None], output_router_logits=True).router_logits  # per layer [len, E]


@pytest.mark.distributed
def test_aux_loss_is_the_token_weighted_mean_of_hfs(step):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    hf, _ = hf_model("qwen3_moe", num_hidden_layers=1, output_router_logits=True, router_aux_loss_coef=COEF)
    tokens, _, _ = rollout(6)
    assert len(step["seqs"]) >= 2, "the test needs several micro-batches"
    total = sum(len(tokens[i]) for seqs in step["seqs"] for i in seqs)
    aux = 0.0
    for seqs in step["seqs"]:
        logits = torch.cat([_hf_router_logits(hf, tokens[i])[0] for i in seqs])
        lbl = load_balancing_loss_func((logits,), MOE["num_experts"], MOE["num_experts_per_tok"])
        aux = aux + len(logits) / total * COEF * lbl
    hf.zero_grad()
    aux.backward()
    want = hf_grads(hf)
    got = {k: step["with"]["grads"][k] - step["without"]["grads"][k] for k in step["with"]["grads"]}
    assert want["model.layers.0.mlp.gate.weight"].abs().max() > 1e-4  # the aux loss moves the router
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], atol=2e-7, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the reported policy loss is the same with and without the aux loss
    assert step["with"]["loss"] == pytest.approx(step["without"]["loss"], rel=1e-6)
    # HF coefficient 0.1 * top-k 2 / 1 layer, restored after the step
    assert step["with"]["coeff"] == pytest.approx(COEF * 2) and step["without"]["coeff"] == 0.0


@pytest.mark.distributed
def test_router_statistics_count_hfs_routing(step):
    hf, _ = hf_model("qwen3_moe", num_hidden_layers=1)
    tokens, _, _ = rollout(6)
    counts = torch.zeros(MOE["num_experts"])
    for seq in tokens:
        probs = torch.softmax(_hf_router_logits(hf, seq)[0].double(), -1)
        counts += torch.bincount(probs.topk(MOE["num_experts_per_tok"], -1).indices.flatten(),
                                 minlength=MOE["num_experts"])
    stats = step["with"]["stats"]
    assert stats["moe/tokens_routed"] == sum(len(t) for t in tokens) * MOE["num_experts_per_tok"]
    assert [stats[f"moe/layer_0/expert_{e}/tokens"] for e in range(MOE["num_experts"])] == counts.tolist()
    mean = counts.mean()
    assert stats["moe/load_max_over_mean"] == pytest.approx(float(counts.max() / mean))
    assert stats["moe/load_min_over_mean"] == pytest.approx(float(counts.min() / mean))
    assert stats["moe/dead_experts"] == float((counts == 0).sum())
    assert step["with"]["again"] == {}, "the counts are reset by each read"


def _tp2_moe_training(rank, world):
    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.model.train_step import build_policy

    initialize_parallel(2, 1)
    try:
        build_policy(hf_model("qwen3_moe")[1], OptimConfig(), total_steps=1)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.distributed
def test_moe_training_at_tp2_needs_sequence_parallelism():
    for message in spawn(_tp2_moe_training, 2):
        assert message and "parallel.sequence_parallel" in message and "parallel.ep" in message
