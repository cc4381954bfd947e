"""KL estimators: closed forms, non-negativity, Monte Carlo unbiasedness, gradients; entropy."""
import math

import pytest
import torch

import megatron_skpo.algo  # noqa: F401
from megatron_skpo.algo.kl import entropy_bonus, entropy_from_logits
from megatron_skpo.algo.registries import KL_ESTIMATORS

D = torch.float64


def test_hand_values():
    lp = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=D)
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]], dtype=D)
    d = math.log(2.0)  # |log p - log q| in both tokens
    torch.testing.assert_close(KL_ESTIMATORS.get("k1")(lp, ref), torch.tensor([[d, -d]], dtype=D))
    torch.testing.assert_close(KL_ESTIMATORS.get("k2")(lp, ref), torch.tensor([[d * d / 2] * 2], dtype=D))
    # k3 = q/p - log(q/p) - 1: q/p = 0.5 then 2
    k3 = [[0.5 + d - 1, 2 - d - 1]]
    torch.testing.assert_close(KL_ESTIMATORS.get("k3")(lp, ref), torch.tensor(k3, dtype=D))


def test_k2_k3_nonnegative_and_zero_on_agreement_finite_on_extremes():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(64, 9, generator=g, dtype=D) * 30
    ref = -torch.rand(64, 9, generator=g, dtype=D) * 30
    for name in ("k2", "k3"):
        est = KL_ESTIMATORS.get(name)(lp, ref)
        assert (est >= 0).all() and torch.isfinite(est).all()
        assert KL_ESTIMATORS.get(name)(lp, lp).abs().max() == 0
    tiny = KL_ESTIMATORS.get("k3")(torch.zeros(1, dtype=D), torch.tensor([1e-9], dtype=D))
    assert tiny.item() == pytest.approx(0.5e-18, rel=1e-6)  # expm1 keeps precision near 0


def test_monte_carlo_expectations_match_exact_kl():
    g = torch.Generator().manual_seed(7)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=D)
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x].unsqueeze(0), q.log()[x].unsqueeze(0)
    for name in ("k1", "k3"):  # unbiased
        assert KL_ESTIMATORS.get(name)(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)
    # k2 is biased upward here but close for small KL
    assert KL_ESTIMATORS.get("k2")(lp, lq).mean().item() == pytest.approx(exact, abs=0.05)


def test_gradients_wrt_current_log_probs():
    lp = torch.tensor([[-0.3, -1.2, -2.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-0.5, -1.0, -2.0]], dtype=D)
    expected = {
        "k1": torch.ones_like(ref),
        "k2": (lp - ref).detach(),
        "k3": 1 - (ref - lp).detach().exp(),
    }
    for name, grad in expected.items():
        (g,) = torch.autograd.grad(KL_ESTIMATORS.get(name)(lp, ref).sum(), lp)
        torch.testing.assert_close(g, grad)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="ref_log_probs"):
        KL_ESTIMATORS.get("k3")(torch.zeros(2, 3), torch.zeros(2, 4))


def test_entropy_from_logits_and_bonus():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]], dtype=D)
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.tensor([math.log(4), 0.0], dtype=torch.float32), atol=1e-6, rtol=0)
    p = torch.tensor([0.7, 0.2, 0.1])
    torch.testing.assert_close(entropy_from_logits(p.log()), -(p * p.log()).sum())
    torch.testing.assert_close(entropy_bonus(h, 0.01), -0.01 * h)
