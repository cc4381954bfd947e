"""Fused vocab-parallel log-prob/entropy vs log_softmax of full fp64 logits, values and gradients."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_skpo.model.logprob import fused_logprob_entropy, naive_logprob_entropy
from mp_helpers import spawn

T, H, V = 37, 16, 24


def reference(hidden, weight, target, vocab_size=None, temperature=1.0):
    """fp64 full logits -> log_softmax -> gather; entropy from the same log-probs."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    logp_all = torch.log_softmax(logits, -1)
    return logp_all.gather(1, target[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def _inputs(seed=0, t=T, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, generator=g), torch.randn(v, h, generator=g) * 0.5,
            torch.randint(0, v, (t,), generator=g), torch.randn(t, generator=g), torch.randn(t, generator=g))


def _grads(fn, hidden, weight, target, g_logp, g_ent, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fn(h, w, target, **kw)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def test_hand_worked_two_token_vocab():
    # one token, V=2, logits (0, log 3): p = (1/4, 3/4); log p(y=1) = log(3/4);
    # entropy = -(1/4 log 1/4 + 3/4 log 3/4)
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    logp, ent = fused_logprob_entropy(hidden, weight, torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-7)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-7)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000], ids=["chunk1", "chunk5", "exact", "one-chunk"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_fp64_reference_tp1(chunk, temperature):
    hidden, weight, target, g_logp, g_ent = _inputs()
    got = _grads(fused_logprob_entropy, hidden, weight, target, g_logp, g_ent,
                 chunk=chunk, temperature=temperature)
    ref = _grads(reference, hidden.double(), weight.double(), target, g_logp.double(),
                 g_ent.double(), temperature=temperature)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab_size", [None, V - 5], ids=["full", "padded"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_only_loss_skips_the_entropy_term(vocab_size, temperature):
    # the entropy output unused (no entropy bonus): backward gets None for it and drops its term
    hidden, weight, target, g_logp, _ = _inputs()
    target = target % (vocab_size or V)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = fused_logprob_entropy(h, w, target, chunk=10, temperature=temperature, vocab_size=vocab_size)
    (logp * g_logp).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref, _ = reference(h64, w64, target, vocab_size=vocab_size, temperature=temperature)
    (ref * g_logp.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [16, 1000], ids=["chunks", "one-chunk"])
def test_bf16_weights_match_the_fp64_reference_to_bf16_rounding(chunk):
    # bf16 matmuls (logits, both gradients), fp32 softmax maths and fp32 sums over chunks
    hidden, weight, target, g_logp, g_ent = _inputs(t=64, h=32, v=40)
    got = _grads(fused_logprob_entropy, hidden.bfloat16(), weight.bfloat16(), target, g_logp, g_ent, chunk=chunk)
    ref = _grads(reference, hidden.bfloat16().double(), weight.bfloat16().double(), target, g_logp.double(),
                 g_ent.double())
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=0.05 * b.abs().max().item(), rtol=0)


def test_padded_vocab_columns_are_masked():
    hidden, weight, target, g_logp, g_ent = _inputs()
    padded = torch.cat([weight, torch.randn(8, H)])  # junk rows: must not change anything
    got = _grads(fused_logprob_entropy, hidden, padded, target, g_logp, g_ent, vocab_size=V, chunk=8)
    ref = _grads(reference, hidden.double(), weight.double(), target, g_logp.double(), g_ent.double())
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[3][:V].double(), ref[3], atol=1e-5, rtol=0)
    assert torch.all(got[3][V:] == 0)


def test_tied_embedding_gradient_accumulates():
    # hidden = tanh(E[ids] A): the embedding E receives gradient from the lookup and the output.
    g = torch.Generator().manual_seed(3)
    emb, proj = torch.randn(V, H, generator=g) * 0.5, torch.randn(H, H, generator=g) * 0.3
    ids, target = torch.randint(0, V, (T,), generator=g), torch.randint(0, V, (T,), generator=g)

    def total_grad(fn, dtype):
        e = emb.to(dtype).clone().requires_grad_()
        logp, ent = fn(torch.tanh(e[ids] @ proj.to(dtype)), e, target)
        (logp.sum() + 0.3 * ent.sum()).backward()
        return e.grad.double()

    fused = total_grad(lambda h, w, y: fused_logprob_entropy(h, w, y, chunk=7), torch.float32)
    torch.testing.assert_close(fused, total_grad(reference, torch.float64), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 20), v=st.integers(2, 30), chunk=st.integers(1, 25), scale=st.floats(0.1, 20.0))
def test_property_logprob_normalised_and_entropy_bounded(t, v, chunk, scale):
    hidden, weight, target, _, _ = _inputs(seed=t * 31 + v, t=t, v=v)
    logp, ent = fused_logprob_entropy(hidden * scale, weight, target, chunk=chunk)
    ref_logp, ref_ent = reference(hidden * scale, weight, target)
    assert torch.all(logp <= 1e-6) and torch.all(ent >= -1e-5) and torch.all(ent <= math.log(v) + 1e-5)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-4, rtol=1e-5)


def test_naive_path_matches_reference():
    hidden, weight, target, *_ = _inputs()
    for a, b in zip(naive_logprob_entropy(hidden, weight, target), reference(hidden, weight, target)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="target must be"):
        fused_logprob_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long),
                              temperature=0.0)


def _tp_worker(rank, world, tied):
    import torch.distributed as dist

    hidden, weight, target, g_logp, g_ent = _inputs(seed=7, v=2 * V - 6)  # odd vocab: padded
    vocab = weight.shape[0]
    padded = torch.cat([weight, torch.zeros(2 * V - vocab, H)])
    shard = padded.chunk(world)[rank]
    if tied:  # the same shard also embeds the inputs (vocab-parallel embedding by hand)
        ids = target.roll(1)
        local = torch.where((ids >= rank * V) & (ids < (rank + 1) * V), ids - rank * V, 0)
        mask = ((ids >= rank * V) & (ids < (rank + 1) * V)).float()[:, None]
        w = shard.clone().requires_grad_()
        emb = w[local] * mask
        dist.all_reduce(emb)  # forward only: the grad path below sums the shard's own rows
        emb = emb.detach() + (w[local] * mask - (w[local] * mask).detach())
        h = torch.tanh(hidden + emb)
    else:
        w = shard.clone().requires_grad_()
        h0 = hidden.clone().requires_grad_()
        h = h0
    logp, ent = fused_logprob_entropy(h, w, target, group=dist.group.WORLD, vocab_start=rank * V,
                                      vocab_size=vocab, chunk=6, temperature=0.8)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, w.grad, (None if tied else h0.grad)


@pytest.mark.distributed
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp2_matches_fp64_reference(tied):
    hidden, weight, target, g_logp, g_ent = _inputs(seed=7, v=2 * V - 6)
    results = spawn(_tp_worker, 2, tied)
    w = weight.double().clone().requires_grad_()
    if tied:
        h0 = hidden.double()
        h = torch.tanh(h0 + w[target.roll(1)])
    else:
        h0 = hidden.double().clone().requires_grad_()
        h = h0
    logp, ent = reference(h, w, target, temperature=0.8)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    for rank_logp, rank_ent, _, _ in results:
        torch.testing.assert_close(rank_logp.double(), logp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(rank_ent.double(), ent.detach(), atol=1e-5, rtol=0)
    grad_w = torch.cat([r[2] for r in results])
    torch.testing.assert_close(grad_w[: w.shape[0]].double(), w.grad, atol=1e-5, rtol=0)
    assert torch.all(grad_w[w.shape[0]:] == 0)
    if not tied:
        for r in results:
            torch.testing.assert_close(r[3].double(), h0.grad, atol=1e-5, rtol=0)


def test_cpu_scratch_is_reused_and_can_be_released():
    from megatron_skpo.model import logprob

    hidden, weight, target, g_logp, g_ent = _inputs()
    first = _grads(fused_logprob_entropy, hidden, weight, target, g_logp, g_ent, chunk=8)
    buffers = {k: v.data_ptr() for k, v in logprob._CPU_SCRATCH.items()}
    assert buffers  # kept after the call
    _grads(fused_logprob_entropy, hidden[:5], weight, target[:5], g_logp[:5], g_ent[:5], chunk=8)
    assert {k: v.data_ptr() for k, v in logprob._CPU_SCRATCH.items()} == buffers  # a smaller call reuses them
    logprob.release_cpu_scratch()
    assert not logprob._CPU_SCRATCH
    again = _grads(fused_logprob_entropy, hidden, weight, target, g_logp, g_ent, chunk=8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
