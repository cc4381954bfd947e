"""Off-policy correction of stale rows: hand-worked values, the synchronous case unchanged, and the
loss the trainer builds for a mini-batch with and without stale rows (SKPO's two phases included)."""
import math

import pytest
import torch

import megatron_skpo.algo  # noqa: F401  (populates the registries)
from megatron_skpo.algo.off_policy import OffPolicySettings, off_policy_inputs
from megatron_skpo.algo.registries import OFF_POLICY_CORRECTIONS
from megatron_skpo.algo.tis import tis_weights

D = torch.float64
LOG = math.log
# three tokens: pi_prox / mu = 2, 0.5, 20 (the last one hits the cap 5)
OLD = torch.tensor([[LOG(0.4), LOG(0.1), LOG(0.2)]], dtype=D)
MU = torch.tensor([[LOG(0.2), LOG(0.2), LOG(0.01)]], dtype=D)


def test_registered_names():
    assert set(OFF_POLICY_CORRECTIONS.names()) == {"decoupled", "behaviour"}


@pytest.mark.parametrize("tis_cap", [None, 2.0], ids=["tis-off", "tis-on"])
@pytest.mark.parametrize("name", ["decoupled", "behaviour"])
def test_no_stale_row_is_the_synchronous_input(name, tis_cap):
    """max_staleness 0: the ratio's denominator is pi_old and the weights are TIS's (or none)."""
    stale = torch.zeros_like(OLD, dtype=torch.bool)
    old, w = off_policy_inputs(name, OLD, MU, stale, OffPolicySettings(5.0, tis_cap))
    assert torch.equal(old, OLD)
    if tis_cap is None:
        assert w is None
    else:
        assert torch.equal(w, tis_weights(OLD, MU, tis_cap))


def test_decoupled_hand_worked():
    """Ratio stays against pi_prox; stale tokens weighted by min(pi_prox / mu, 5): 2, 0.5, 5."""
    stale = torch.tensor([[True, True, True]])
    old, w = off_policy_inputs("decoupled", OLD, MU, stale, OffPolicySettings(5.0))
    assert torch.equal(old, OLD)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 5.0]], dtype=D), atol=1e-12)
    assert not w.requires_grad


def test_decoupled_mixed_rows_with_tis():
    """A stale token gets the behaviour weight (cap 5), a fresh one TIS's (cap 2): 20 -> 5, 0.5 -> 0.5, 20 -> 2."""
    stale = torch.tensor([[True, False, False]])
    mu = torch.tensor([[LOG(0.02), LOG(0.2), LOG(0.01)]], dtype=D)
    _, w = off_policy_inputs("decoupled", OLD, mu, stale, OffPolicySettings(5.0, tis_cap=2.0))
    assert torch.allclose(w, torch.tensor([[5.0, 0.5, 2.0]], dtype=D), atol=1e-12)


def test_behaviour_hand_worked():
    """Stale tokens take their ratio against mu; fresh ones keep pi_old; no extra weight."""
    stale = torch.tensor([[True, False, True]])
    old, w = off_policy_inputs("behaviour", OLD, MU, stale, OffPolicySettings(5.0))
    assert torch.equal(old, torch.tensor([[LOG(0.2), LOG(0.1), LOG(0.01)]], dtype=D))
    assert w is None


def test_shapes_and_names_are_checked():
    with pytest.raises(ValueError, match="shapes differ"):
        off_policy_inputs("decoupled", OLD, MU[:, :2], torch.zeros(1, 2, dtype=torch.bool), OffPolicySettings())
    with pytest.raises(KeyError):
        off_policy_inputs("nope", OLD, MU, torch.zeros_like(OLD, dtype=torch.bool), OffPolicySettings())
