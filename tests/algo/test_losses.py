"""Policy losses: hand-worked values, autograd against closed-form gradients, loop references."""
import math

import pytest
import torch

import megatron_skpo.algo  # noqa: F401  (populates the registries)
from megatron_skpo.algo.aggregation import aggregate
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams, policy_objective
from megatron_skpo.algo.registries import POLICY_LOSSES
from megatron_skpo.algo.tis import tis_weights

D = torch.float64
# One row of hand-worked PPO cases: ratio r, advantage A; bounds [0.8, 1.28].
RATIOS = [1.1, 1.5, 0.5, 0.9, 3.0, 1.5, 0.5]
ADVS = [1.0, 1.0, -1.0, -2.0, -1.0, -1.0, 1.0]
# -max(rA, clip(r)A) by hand; case ids: inside, high-clip, low-clip, inside(A<0), r big with A<0
# (unclipped side is the pessimistic one), r high with A<0 (no clip), r low with A>0 (no clip).
PPO_LOSS = [-1.1, -1.28, 0.8, 1.8, 3.0, 1.5, -0.5]
PPO_GRAD = [-1.1, 0.0, 0.0, 1.8, 3.0, 1.5, -0.5]  # d/dlogp of -A r on the active branch, else 0


def make_input(ratios, advs, old=-1.0, mask=None):
    old_lp = torch.full((1, len(ratios)), old, dtype=D)
    lp = (old_lp + torch.tensor([ratios], dtype=D).log()).requires_grad_(True)
    m = torch.ones(1, len(ratios), dtype=torch.bool) if mask is None else torch.tensor([mask])
    return PolicyLossInput(lp, old_lp, torch.tensor([advs], dtype=D), m)


def grad_of(per_token, inp):
    (g,) = torch.autograd.grad(per_token.sum(), inp.log_probs)
    return g


def test_registry_names_and_duplicates():
    assert {"ppo_clip", "cispo", "gspo", "reinforce"} <= set(POLICY_LOSSES.names())
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("ppo_clip")(lambda inp, params: None)


def test_ppo_clip_hand_values_and_gradients():
    inp = make_input(RATIOS, ADVS)
    loss, stats = POLICY_LOSSES.get("ppo_clip")(inp, PolicyLossParams())
    torch.testing.assert_close(loss, torch.tensor([PPO_LOSS], dtype=D))
    torch.testing.assert_close(grad_of(loss, inp), torch.tensor([PPO_GRAD], dtype=D))
    assert stats["clip_high"].tolist() == [[0, 1, 0, 0, 0, 0, 0]]
    assert stats["clip_low"].tolist() == [[0, 0, 1, 0, 0, 0, 0]]
    assert stats["dual_clip"].sum() == 0
    torch.testing.assert_close(stats["ratio"], torch.tensor([RATIOS], dtype=D))
    r = torch.tensor(RATIOS, dtype=D)
    torch.testing.assert_close(stats["kl_old_k1"][0], -r.log())
    torch.testing.assert_close(stats["kl_old_k3"][0], r - 1 - r.log())


def test_ppo_dual_clip_bounds_negative_advantages():
    inp = make_input(RATIOS, ADVS)
    loss, stats = POLICY_LOSSES.get("ppo_clip")(inp, PolicyLossParams(dual_clip_c=2.0))
    # only case 4 (r=3, A=-1: loss 3.0 > c*|A| = 2.0) changes; its gradient vanishes
    expected = list(PPO_LOSS)
    expected[4] = 2.0
    grads = list(PPO_GRAD)
    grads[4] = 0.0
    torch.testing.assert_close(loss, torch.tensor([expected], dtype=D))
    torch.testing.assert_close(grad_of(loss, inp), torch.tensor([grads], dtype=D))
    assert stats["dual_clip"].tolist() == [[0, 0, 0, 0, 1, 0, 0]]


def test_cispo_hand_values_and_gradient_is_clipped_weight_times_advantage():
    inp = make_input(RATIOS, ADVS, old=-0.7)
    loss, stats = POLICY_LOSSES.get("cispo")(inp, PolicyLossParams())
    w = torch.tensor(RATIOS, dtype=D).clamp(0.8, 1.28)
    a = torch.tensor(ADVS, dtype=D)
    torch.testing.assert_close(loss[0], -w * a * inp.log_probs.detach()[0])
    # exactly -clip(r) A with r as the loss computed it (exp(log r) != r in the last bit)
    exact = -stats["ratio"][0].clamp(0.8, 1.28) * a
    torch.testing.assert_close(grad_of(loss, inp)[0], exact, rtol=0, atol=0)
    # the weight is clipped whatever the sign of A; the token still gets a gradient
    assert stats["clip_high"].tolist() == [[0, 1, 0, 0, 1, 1, 0]]
    assert stats["clip_low"].tolist() == [[0, 0, 1, 0, 0, 0, 1]]


def test_cispo_eps_low_one_is_minimax_upper_only_clip():
    inp = make_input([0.05, 2.0], [1.0, 1.0])
    loss, _ = POLICY_LOSSES.get("cispo")(inp, PolicyLossParams(eps_low=1.0))
    torch.testing.assert_close(grad_of(loss, inp)[0], torch.tensor([-0.05, -1.28], dtype=D))


def test_reinforce_hand_values():
    inp = make_input([1.0, 2.0], [2.0, -1.0], old=-0.5)
    loss, _ = POLICY_LOSSES.get("reinforce")(inp, PolicyLossParams())
    lp = inp.log_probs.detach()[0]
    torch.testing.assert_close(loss[0], torch.stack([-2.0 * lp[0], lp[1]]))
    torch.testing.assert_close(grad_of(loss, inp)[0], torch.tensor([-2.0, 1.0], dtype=D))


@pytest.mark.parametrize("name", ["ppo_clip", "cispo", "gspo", "sapo"])
def test_on_policy_gradient_equals_reinforce(name):
    """At r = 1 every clipped surrogate has REINFORCE's gradient -A per token."""
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g, dtype=D) * 3
    adv = torch.randn(3, 1, generator=g, dtype=D).expand(3, 5).contiguous()
    mask = torch.rand(3, 5, generator=g) > 0.3
    grads = []
    for loss_name in (name, "reinforce"):
        inp = PolicyLossInput(old.clone().requires_grad_(True), old, adv, mask)
        loss, _ = POLICY_LOSSES.get(loss_name)(inp, PolicyLossParams())
        grads.append(grad_of(loss, inp))
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[1], torch.where(mask, -adv, torch.zeros(())))


def test_losses_are_zero_outside_mask_even_with_garbage():
    inp = make_input([1.1, 1.2, 0.9], [1.0, -1.0, 1.0], mask=[True, False, True])
    inp.advantages[0, 1] = float("nan")  # padding garbage
    inp.old_log_probs[0, 1] = float("-inf")
    for name in POLICY_LOSSES.names():
        loss, _ = POLICY_LOSSES.get(name)(inp, PolicyLossParams())
        assert loss[0, 1] == 0 and torch.isfinite(loss).all(), name
        assert torch.isfinite(grad_of(loss, inp)).all(), name


def gspo_reference(inp, params):
    """Slow loop: the sequence-level GSPO loss averaged over sequences (differentiable)."""
    terms = []
    for i in range(inp.log_probs.shape[0]):
        idx = inp.mask[i].nonzero().flatten().tolist()
        if not idx:
            continue
        s = torch.exp(sum(inp.log_probs[i, t] - inp.old_log_probs[i, t] for t in idx) / len(idx))
        a = inp.advantages[i, idx[0]]
        clipped = s.clamp(1 - params.gspo_eps_low, 1 + params.gspo_eps_high)
        terms.append(torch.maximum(-s * a, -clipped * a))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("scale", [1e-5, 1e-2], ids=["mostly-unclipped", "mostly-clipped"])
def test_gspo_token_form_matches_sequence_level_loop(scale):
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(4, 6, generator=g, dtype=D) * 2
    lp = (old + scale * torch.randn(4, 6, generator=g, dtype=D)).requires_grad_(True)
    adv = torch.randn(4, 1, generator=g, dtype=D).expand(4, 6).contiguous()
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[0, 0] = True
    inp, params = PolicyLossInput(lp, old, adv, mask), PolicyLossParams()
    per_token, stats = POLICY_LOSSES.get("gspo")(inp, params)
    seqs = int(mask.any(-1).sum())
    fast = aggregate(per_token, mask, "seq-mean-token-mean", int(mask.sum()), seqs)
    slow = gspo_reference(inp, params)
    torch.testing.assert_close(fast, slow)
    (g_fast,) = torch.autograd.grad(fast, lp)
    (g_slow,) = torch.autograd.grad(slow, lp)
    torch.testing.assert_close(g_fast, g_slow)
    # the reported ratio is the sequence ratio on every token of the sequence
    r0 = torch.exp(((lp - old)[0][mask[0]]).mean()).detach()
    torch.testing.assert_close(stats["ratio"][0][mask[0]], r0.expand(int(mask[0].sum())))


def test_gspo_hand_value():
    # one sequence, log-ratios 0.1 and 0.3 -> s = e^0.2 > 1 + 4e-4: clipped, zero gradient
    inp = make_input([math.exp(0.1), math.exp(0.3)], [1.0, 1.0])
    loss, stats = POLICY_LOSSES.get("gspo")(inp, PolicyLossParams())
    torch.testing.assert_close(loss, torch.full((1, 2), -(1 + 4e-4), dtype=D))
    assert grad_of(loss, inp).abs().sum() == 0 and stats["clip_high"].sum() == 2


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sapo_hand_values_and_gradients():
    """loss -(4/tau) sigma(tau (r - 1)) A, tau 1.0 for A > 0 and 1.05 otherwise; d/dlogp = -A 4 sigma (1 - sigma) r."""
    ratios, advs = [1.0, 2.0, 1.0, 0.5, 20.0, 1.3], [1.0, 1.0, -2.0, -2.0, 1.0, 0.0]
    inp = make_input(ratios, advs)
    loss, stats = POLICY_LOSSES.get("sapo")(inp, PolicyLossParams())
    taus = [1.0, 1.0, 1.05, 1.05, 1.0, 1.05]
    sig = [_sig(t * (r - 1)) for r, t in zip(ratios, taus)]
    want = [-(4 / t) * s * a for t, s, a in zip(taus, sig, advs)]
    assert want[0] == -2.0 and want[2] == pytest.approx(8 / 2.1) and want[1] == pytest.approx(-2.9242343)
    torch.testing.assert_close(loss[0], torch.tensor(want, dtype=D))
    weight = [4 * s * (1 - s) for s in sig]
    g = grad_of(loss, inp)[0]
    torch.testing.assert_close(g, torch.tensor([-a * w * r for a, w, r in zip(advs, weight, ratios)], dtype=D))
    torch.testing.assert_close(stats["gate"][0], torch.tensor(weight, dtype=D))
    assert g[0] == -1.0 and g[2] == pytest.approx(2.0)  # on-policy: REINFORCE's -A
    assert 0 < -g[4] < 1e-6  # far off-policy: damped, not cut (PPO-clip's gradient there is exactly 0)
    assert stats["clip_low"].sum() == 0 and stats["clip_high"].sum() == 0


def test_sapo_temperatures_are_the_sign_of_a():
    """A steeper tau_neg damps a negative token's gradient faster as r leaves 1."""
    inp = make_input([1.5, 1.5], [1.0, -1.0])
    loss, _ = POLICY_LOSSES.get("sapo")(inp, PolicyLossParams(sapo_tau_pos=1.0, sapo_tau_neg=3.0))
    g = grad_of(loss, inp)[0]
    w_pos, w_neg = 4 * _sig(0.5) * (1 - _sig(0.5)), 4 * _sig(1.5) * (1 - _sig(1.5))
    torch.testing.assert_close(g, torch.tensor([-w_pos * 1.5, w_neg * 1.5], dtype=D))
    assert abs(g[1]) < abs(g[0])
    with pytest.raises(ValueError, match="sapo_tau_neg"):
        PolicyLossParams(sapo_tau_neg=0.0)


def test_input_and_params_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        PolicyLossInput(x, x, torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossParams(dual_clip_c=0.5)
    with pytest.raises(ValueError, match="eps_low"):
        PolicyLossParams(eps_low=1.5)


def batch(seed=3, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=D) * 2
    lp = (old + 0.3 * torch.randn(b, t, generator=g, dtype=D)).requires_grad_(True)
    adv = torch.randn(b, t, generator=g, dtype=D)
    mask = torch.rand(b, t, generator=g) > 0.25
    return PolicyLossInput(lp, old, adv, mask), g


def test_policy_objective_composes_pg_tis_kl_entropy():
    inp, g = batch()
    ref = inp.old_log_probs - 0.1 * torch.rand(inp.mask.shape, generator=g, dtype=D)
    ent = torch.rand(inp.mask.shape, generator=g, dtype=D).requires_grad_(True)
    w = tis_weights(inp.old_log_probs, inp.old_log_probs + 0.2 * torch.randn(inp.mask.shape, dtype=D), 2.0)
    n_tok, n_seq = int(inp.mask.sum()), int(inp.mask.any(-1).sum())
    loss, metrics = policy_objective(
        inp, PolicyLossParams(), "ppo_clip", "token-mean", n_tok, n_seq,
        ref_log_probs=ref, kl_estimator="k2", kl_coef=0.1, entropy=ent, entropy_coef=0.01, tis_weights=w,
    )
    pg, _ = POLICY_LOSSES.get("ppo_clip")(inp, PolicyLossParams())
    kl = 0.5 * (inp.log_probs - ref) ** 2
    by_hand = ((pg * w + 0.1 * kl - 0.01 * ent) * inp.mask).sum() / n_tok
    torch.testing.assert_close(loss, by_hand)
    means = metrics.means()
    torch.testing.assert_close(means["loss"], by_hand.item())
    torch.testing.assert_close(means["pg_loss"], ((pg * w * inp.mask).sum() / n_tok).item())
    torch.testing.assert_close(means["entropy"], ent.detach()[inp.mask].mean().item())
    torch.testing.assert_close(means["tis_weight"], float(w[inp.mask].mean()))
    assert means["tokens"] == n_tok and means["seqs"] == n_seq
    (g_ent,) = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(g_ent, -0.01 * inp.mask.to(D) / n_tok)


def test_policy_objective_errors():
    inp, _ = batch()
    with pytest.raises(KeyError, match="unknown policy loss 'nope'"):
        policy_objective(inp, PolicyLossParams(), "nope", "token-mean", 1, 1)
    with pytest.raises(ValueError, match="ref_log_probs"):
        policy_objective(inp, PolicyLossParams(), "cispo", "token-mean", 1, 1, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(inp, PolicyLossParams(), "cispo", "token-mean", 1, 1, entropy_coef=0.1)
