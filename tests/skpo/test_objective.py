"""SKPO's two-phase objective: hand values, gradient linearity, empty phases, rank splits."""
import pytest
import torch

from megatron_skpo.algo.aggregation import count_seqs, count_tokens
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams, policy_objective
from megatron_skpo.algo.metrics import LossMetrics
from megatron_skpo.skpo.objective import PhaseCounts, skpo_objective

D = torch.float64
P = PolicyLossParams()


def counts(mask):
    return PhaseCounts(tokens=count_tokens(mask), seqs=count_seqs(mask))


def hand_inputs():
    """On-policy phases (r = 1). Upstream: segment 0 = 2 tokens with A~ = 1, segment 1 = 1 token with
    A~ = -2. Downstream: position 0 is a prompt token (segment of q~), not in the mask: no loss."""
    up_lp = torch.tensor([[-0.3, -0.4], [-0.2, -9.0]], dtype=D, requires_grad=True)
    up = PolicyLossInput(up_lp, up_lp.detach(), torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=D),
                         torch.tensor([[1, 1], [1, 0]], dtype=torch.bool))
    down_lp = torch.tensor([[-7.0, -0.5, -1.0], [-7.0, -2.0, -3.0]], dtype=D, requires_grad=True)
    down = PolicyLossInput(down_lp, down_lp.detach(), torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=D),
                           torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.bool))
    return up_lp, up, down_lp, down


def test_hand_values_on_policy():
    up_lp, up, down_lp, down = hand_inputs()
    loss, metrics = skpo_objective(up, down, P, counts(up.mask), counts(down.mask))
    j1 = ((-1.0 - 1.0) / 2 + 2.0) / 2  # ppo at r=1 is -A per token; seq-mean-token-mean
    j2 = (0.5 + 1.0 - 2.0) / 3  # cispo at r=1 is -A log p; token-mean over 3 response tokens
    torch.testing.assert_close(loss, torch.tensor(0.5 * j1 + 0.5 * j2, dtype=D))
    means = metrics.means()
    assert means["up/loss"] == pytest.approx(j1) and means["down/loss"] == pytest.approx(j2)
    assert means["loss"] == pytest.approx(0.5 * j1 + 0.5 * j2)
    assert means["up/tokens"] == 3 and means["down/tokens"] == 3 and means["down/seqs"] == 2
    assert means["up/clip_high"] == 0 and means["down/ratio"] == pytest.approx(1.0)
    loss.backward()
    assert down_lp.grad[:, 0].abs().sum() == 0  # prompt tokens get no gradient
    torch.testing.assert_close(down_lp.grad[0, 1:], torch.tensor([-0.5 / 3] * 2, dtype=D))


def test_token_pool_is_one_token_mean_over_both_phases():
    # token_pool: (w_up sum_up l + w_down sum_down l) / (N_up + N_down)
    up_lp, up, down_lp, down = hand_inputs()
    loss, metrics = skpo_objective(up, down, P, counts(up.mask), counts(down.mask), upstream_agg_mode="token-mean",
                                   w_up=1.0, w_down=1.0, weighting="token_pool")
    up_sum = -1.0 - 1.0 + 2.0  # ppo at r = 1: -A per segment token
    down_sum = 0.5 + 1.0 - 2.0  # cispo at r = 1: -A log p per response token
    torch.testing.assert_close(loss, torch.tensor((up_sum + down_sum) / 6, dtype=D))
    loss.backward()
    # every trained token's gradient is -A / 6 (upstream) or -A / 6 (cispo's d/dlogp), whatever its phase
    torch.testing.assert_close(up_lp.grad, torch.tensor([[-1 / 6, -1 / 6], [2 / 6, 0.0]], dtype=D))
    torch.testing.assert_close(down_lp.grad, torch.tensor([[0.0, -1 / 6, -1 / 6], [0.0, 1 / 6, 0.0]], dtype=D))
    with pytest.raises(ValueError, match="token-mean"):
        skpo_objective(up, down, P, counts(up.mask), counts(down.mask), weighting="token_pool")


def test_token_pool_config_names_the_fields_to_set():
    from megatron_skpo.config import ConfigError, load_config

    cfg = load_config(None, ["algo.skpo.phase_weighting=token_pool", "algo.skpo.upstream_agg_mode=token-mean"])
    from megatron_skpo.catalog import build_method

    assert [p.pool for p in build_method(cfg, tokenizer=None).phases] == ["skpo", "skpo"]
    assert [p.pool for p in build_method(load_config(None, []), tokenizer=None).phases] == [None, None]
    with pytest.raises(ConfigError, match="upstream_agg_mode=token-mean"):
        load_config(None, ["algo.skpo.phase_weighting=token_pool"])


class TinyPolicy(torch.nn.Module):
    """A position-independent categorical policy: log pi(y) = log_softmax(theta)[y]."""

    def __init__(self, vocab=6):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.randn(vocab, dtype=D))

    def forward(self, tokens):
        return torch.log_softmax(self.theta, -1)[tokens]


def phase(policy, b, t, g, spread=0.3):
    tokens = torch.randint(0, 6, (b, t), generator=g)
    lp = policy(tokens)
    old = lp.detach() + spread * torch.randn(b, t, generator=g, dtype=D)
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, t).contiguous()
    mask = torch.rand(b, t, generator=g) > 0.3
    return PolicyLossInput(lp, old, adv, mask)


def test_combined_gradient_is_weighted_sum_of_phase_gradients():
    g = torch.Generator().manual_seed(4)
    policy = TinyPolicy()
    up, down = phase(policy, 4, 5, g), phase(policy, 6, 7, g)
    loss, _ = skpo_objective(up, down, P, counts(up.mask), counts(down.mask), w_up=0.3, w_down=0.9)
    (g_total,) = torch.autograd.grad(loss, policy.theta, retain_graph=True)
    j1, _ = policy_objective(up, P, "ppo_clip", "seq-mean-token-mean", count_tokens(up.mask), count_seqs(up.mask))
    j2, _ = policy_objective(down, P, "cispo", "token-mean", count_tokens(down.mask), count_seqs(down.mask))
    (g1,) = torch.autograd.grad(j1, policy.theta, retain_graph=True)
    (g2,) = torch.autograd.grad(j2, policy.theta)
    torch.testing.assert_close(g_total, 0.3 * g1 + 0.9 * g2)
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0


@pytest.mark.parametrize("empty", ["zero-rows", "zero-mask"])
@pytest.mark.parametrize("other_ranks_have_tokens", [False, True])
def test_empty_upstream_phase_contributes_zero(empty, other_ranks_have_tokens):
    g = torch.Generator().manual_seed(5)
    policy = TinyPolicy()
    down = phase(policy, 3, 4, g)
    if empty == "zero-rows":
        z = policy(torch.zeros(0, 4, dtype=torch.long))
        up = PolicyLossInput(z, z.detach(), z.detach(), torch.zeros(0, 4, dtype=torch.bool))
    else:
        up = phase(policy, 2, 4, g)
        up.mask.zero_()
    up_counts = PhaseCounts(tokens=9, seqs=2) if other_ranks_have_tokens else counts(up.mask)
    loss, metrics = skpo_objective(up, down, P, up_counts, counts(down.mask))
    j2, _ = policy_objective(down, P, "cispo", "token-mean", count_tokens(down.mask), count_seqs(down.mask))
    torch.testing.assert_close(loss, 0.5 * j2)
    (grad,) = torch.autograd.grad(loss, policy.theta)
    assert torch.isfinite(grad).all()
    means = metrics.means()
    assert "up/clip_low" in metrics.names() and "up/clip_low" not in means  # key kept, count 0
    assert means["up/loss"] == 0.0 and means["up/tokens"] == 0


def test_rank_split_sums_to_whole_batch_loss_and_metrics():
    g = torch.Generator().manual_seed(6)
    policy = TinyPolicy()
    up, down = phase(policy, 6, 5, g, spread=0.5), phase(policy, 8, 6, g, spread=0.5)
    up_c, down_c = counts(up.mask), counts(down.mask)
    whole, whole_metrics = skpo_objective(up, down, P, up_c, down_c)

    def rows(inp, a, b):
        return PolicyLossInput(inp.log_probs[a:b], inp.old_log_probs[a:b], inp.advantages[a:b], inp.mask[a:b])

    parts = [skpo_objective(rows(up, 0, 2), rows(down, 0, 5), P, up_c, down_c),
             skpo_objective(rows(up, 2, 6), rows(down, 5, 8), P, up_c, down_c)]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole)
    flat = parts[0][1].to_tensor() + parts[1][1].to_tensor()  # what an all-reduce(SUM) returns
    reduced = parts[0][1].from_tensor(flat).means()
    expected = whole_metrics.means()
    assert reduced.keys() == expected.keys()
    for key, value in expected.items():
        assert reduced[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert isinstance(whole_metrics, LossMetrics) and {"up/clip_low", "down/clip_high", "down/loss"} <= set(reduced)
