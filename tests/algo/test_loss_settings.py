"""Each policy loss declares the ``PolicyLossParams`` fields it reads (``POLICY_LOSSES.meta(name)["reads"]``),
and each field declares its config key. The declaration is checked against the function: changing a
declared field changes the loss, changing any other field leaves it bit-for-bit equal."""
from dataclasses import fields, replace

import pytest
import torch

import megatron_skpo.algo  # noqa: F401  (populates the registries)
from megatron_skpo.algo.losses import PolicyLossInput, PolicyLossParams
from megatron_skpo.algo.registries import POLICY_LOSSES
from megatron_skpo.settings import config_keys

D = torch.float64
# a value other than the default for each field, inside its valid range
OTHER = {"eps_low": 0.1, "eps_high": 0.5, "dual_clip_c": 1.5, "gspo_eps_low": 1e-2, "gspo_eps_high": 2e-2,
         "sapo_tau_pos": 2.0, "sapo_tau_neg": 0.5, "shaping_gamma": 0.3}


def _input():
    """Log-ratios up to +-1.5 and advantages of both signs: every bound of every loss is active somewhere."""
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 8, generator=g, dtype=D) * 2
    lp = old + torch.linspace(-1.5, 1.5, 48, dtype=D).reshape(6, 8)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=D)[:, None].expand(6, 8).contiguous()
    return PolicyLossInput(lp, old, adv, torch.ones(6, 8, dtype=torch.bool))


def test_every_params_field_declares_a_config_key_and_a_test_value():
    names = [f.name for f in fields(PolicyLossParams)]
    assert sorted(config_keys(PolicyLossParams)) == sorted(names)
    assert sorted(OTHER) == sorted(names), "give a new PolicyLossParams field a non-default value in OTHER"


@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
def test_declared_reads_are_exactly_the_fields_the_loss_uses(loss):
    fn, reads = POLICY_LOSSES.get(loss), POLICY_LOSSES.meta(loss)["reads"]
    assert set(reads) <= set(OTHER), f"{loss} declares unknown fields {set(reads) - set(OTHER)}"
    inp, base = _input(), PolicyLossParams()
    ref, _ = fn(inp, base)
    for name, value in OTHER.items():
        out, _ = fn(inp, replace(base, **{name: value}))
        changed = not torch.equal(out, ref)
        assert changed == (name in reads), f"{loss}: {name} {'changes' if changed else 'does not change'} the " \
                                           f"loss but is {'not ' if name not in reads else ''}declared in reads"
