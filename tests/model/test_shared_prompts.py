"""Packing rows that share a prompt (a trunk computed once, one branch per row) gives the same
log-probs, entropies and gradients as packing every row separately: Megatron's real forward and
backward at TP=2 and PP=2 over gloo, tiny Llama (GQA, Llama-3 rope scaling) and Qwen2 (tied)."""
from __future__ import annotations

import pytest
import torch

from mp_helpers import spawn
from tiny import hf_model, hf_weights, policy_gradient_loss

ARCHS = ["llama", "qwen2"]


def groups(vocab: int = 200, seed: int = 2):
    """3 prompts x 3 responses (prompt untrained, advantages 0 on it) and one row with its own prompt;
    the 3 prompts start with the same 6 "shots" tokens (shared across trees)."""
    g = torch.Generator().manual_seed(seed)
    tokens, masks, adv, plens = [], [], [], []
    shots = torch.randint(0, vocab, (6,), generator=g)
    for _ in range(3):
        question = torch.randint(0, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        prompt = torch.cat([shots, question])
        for _ in range(3):
            resp = torch.randint(0, vocab, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
            tokens.append(torch.cat([prompt, resp]))
            masks.append(torch.cat([torch.zeros(len(prompt)), torch.ones(len(resp))]))
            adv.append(torch.cat([torch.zeros(len(prompt)), torch.randn(len(resp), generator=g)]))
            plens.append(len(prompt))
    tokens.append(torch.randint(0, vocab, (9,), generator=g))
    masks.append(torch.cat([torch.zeros(4), torch.ones(5)]))
    adv.append(torch.cat([torch.zeros(4), torch.randn(5, generator=g)]))
    plens.append(4)
    return tokens, masks, adv, plens


def _grads(policy) -> torch.Tensor:
    return torch.cat([buf.grad_data.detach().clone().float() for buf in policy.model.buffers])


def _run(policy, mbs, n):
    from megatron_skpo.model.packing import unpack
    from megatron_skpo.model.train_step import forward_backward, forward_logprobs, zero_grads

    logp, ent = [None] * n, [None] * n
    for mb, (lp, h) in zip(mbs, forward_logprobs(policy, mbs)):
        logp = [o if o is not None else u for o, u in zip(logp, unpack(lp, mb, n))]
        ent = [o if o is not None else u for o, u in zip(ent, unpack(h, mb, n))]
    zero_grads(policy)
    forward_backward(policy, mbs, policy_gradient_loss, normalizer=1.0)
    return logp, ent, _grads(policy), sum(mb.num_tokens for mb in mbs)


def _worker(rank, world):
    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.model.packing import pack_sequences
    from megatron_skpo.model.train_step import build_policy

    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        initialize_parallel(tp, pp, seed=3)
        for arch in ARCHS:
            hf, cfg = hf_model(arch)
            policy = build_policy(cfg, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=2,
                                  hf_weights=hf_weights(hf), distributed_optimizer=False)
            tokens, masks, adv, plens = groups()
            plain = pack_sequences(tokens, masks, 40, {"adv": adv})
            shared = pack_sequences(tokens, masks, 40, {"adv": adv}, prompt_lens=plens)
            assert any(mb.shared for mb in shared)
            out[(tp, pp, arch)] = (_run(policy, plain, len(tokens)), _run(policy, shared, len(tokens)))
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, 2, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompts_change_nothing_but_the_token_count(results, arch, layout):
    for rank_out in results:
        (lp_a, h_a, g_a, n_a), (lp_b, h_b, g_b, n_b) = rank_out[(*layout, arch)]
        assert n_b < 0.7 * n_a  # the trunks are computed once
        for a, b in zip(lp_a, lp_b):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=0)
        for a, b in zip(h_a, h_b):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=0)
        torch.testing.assert_close(g_b, g_a, atol=2e-5, rtol=1e-4)
