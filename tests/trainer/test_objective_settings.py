"""The objective's settings are built from ``cfg.algo`` by the keys their fields declare
(``settings.from_config``): no positional copy can leave a new field at its default."""
from dataclasses import dataclass, fields

import pytest

from megatron_skpo.algo.losses import PolicyLossParams
from megatron_skpo.algo.objective import ObjectiveSettings
from megatron_skpo.config import load_config
from megatron_skpo.settings import config_keys, from_config, setting
from megatron_skpo.trainer.objective import objective_settings

# A non-default value for every declared key (a new setting needs one here: the first test says which).
OVERRIDES = {"clip.eps_low": 0.1, "clip.eps_high": 0.3, "clip.dual_clip_c": 2.5, "gspo_eps_low": 1e-3,
             "gspo_eps_high": 2e-3, "norm_length": 2048, "kl.coef": 0.05, "kl.estimator": "k1",
             "entropy_coef": 0.01, "tis.enabled": True, "tis.cap": 4.0, "off_policy": "behaviour",
             "off_policy_cap": 3.0, "sapo_tau_pos": 1.5, "sapo_tau_neg": 2.0, "critique.shaping_gamma": 0.2}
EXPECTED = {"tis_cap": 4.0, "norm_length": 2048.0}  # fields whose value is converted from the config


def _set(node, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        node = getattr(node, part)
    setattr(node, last, value)


def _declared():
    return {**config_keys(PolicyLossParams), **config_keys(ObjectiveSettings)}


def test_every_field_is_read_from_the_config():
    """Each field declares a key (``params`` is built from its own keys) and takes the config's value,
    not its default: this fails for a field added without a key or left out of the build."""
    declared = _declared()
    for cls in (PolicyLossParams, ObjectiveSettings):
        missing = [f.name for f in fields(cls) if f.name not in declared and f.name != "params"]
        assert missing == [], f"{cls.__name__} fields without a config key: {missing}"
    missing = {k for k in declared.values() if not any(o == k or o.startswith(k + ".") for o in OVERRIDES)}
    assert missing == set(), f"give every declared key a non-default value in OVERRIDES: {missing}"
    cfg = load_config(None, [])
    for key, value in OVERRIDES.items():  # set on the built tree: READ_WHEN would refuse some combinations
        _set(cfg.algo, key, value)
    s = objective_settings(cfg.algo)
    for cls, obj in ((PolicyLossParams, s.params), (ObjectiveSettings, s)):
        for name, key in config_keys(cls).items():
            got, default = getattr(obj, name), getattr(cls(), name)
            assert got == EXPECTED.get(name, OVERRIDES.get(key)), f"{cls.__name__}.{name}: {got!r}"
            assert got != default, f"{cls.__name__}.{name} kept its default {default!r}"


def test_a_field_without_a_key_or_a_key_without_a_value_is_an_error():
    @dataclass(frozen=True)
    class NoKey:
        eps_low: float = setting(0.2, "clip.eps_low")
        new_knob: float = 0.5

    @dataclass(frozen=True)
    class UnknownKey:
        new_knob: float = setting(0.5, "clip.new_knob")

    algo = load_config(None, []).algo
    with pytest.raises(TypeError, match=r"NoKey.new_knob declares no config key.*silently keep its default"):
        from_config(NoKey, algo, "algo")
    with pytest.raises(KeyError, match=r"UnknownKey.new_knob reads config key 'algo.clip.new_knob'"):
        from_config(UnknownKey, algo, "algo")
