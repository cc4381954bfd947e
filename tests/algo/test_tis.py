"""Truncated importance sampling weights."""
import math

import pytest
import torch

from megatron_skpo.algo.tis import apply_tis, tis_truncated, tis_weights

D = torch.float64


def test_hand_values_and_truncation():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.9), -1.0]], dtype=D)
    sampler = torch.tensor([[math.log(0.25), math.log(0.3), math.log(0.9), -1.5]], dtype=D)
    w = tis_weights(old, sampler, cap=2.5)
    # ratios 2.0, 3.0 (truncated to 2.5), 1.0, e^0.5
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.5, 1.0, math.exp(0.5)]], dtype=D))
    assert tis_truncated(w, 2.5).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_detached_and_one_when_logprobs_agree():
    old = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = tis_weights(old, old.detach().clone(), cap=2.0)
    assert not w.requires_grad
    assert (w == 1).all()
    loss = apply_tis(old * 3, w).sum()
    (g,) = torch.autograd.grad(loss, old)
    torch.testing.assert_close(g, torch.full_like(g, 3.0))  # weights never get gradients


def test_huge_mismatch_does_not_overflow_and_mask_is_neutral():
    old = torch.tensor([[0.0, 0.0]], dtype=D)
    sampler = torch.tensor([[-1e4, -1e4]], dtype=D)
    w = tis_weights(old, sampler, cap=3.0, mask=torch.tensor([[True, False]]))
    torch.testing.assert_close(w, torch.tensor([[3.0, 1.0]], dtype=D))


def test_errors():
    with pytest.raises(ValueError, match="cap"):
        tis_weights(torch.zeros(1, 2), torch.zeros(1, 2), cap=0.0)
    with pytest.raises(ValueError, match="sampler_log_probs"):
        tis_weights(torch.zeros(1, 2), torch.zeros(1, 3), cap=2.0)
    with pytest.raises(ValueError, match="weights"):
        apply_tis(torch.zeros(1, 2), torch.zeros(2, 1))
