"""READ_WHEN covers every ``algo.*`` key an algorithm ignores, derived from the registries.

What an algorithm reads: every ``cfg.algo`` value its method's builder (``METHODS``, via
``catalog.build_method``) and the trainer's shared pieces (the objective's settings, the value
tracker) touch, traced through a recording config; the settings of the losses and the estimator are
what the registered losses and estimators declare (``reads``; the tracing would see every field of
their settings dataclasses, built whole). A key some algorithm reads and another does not must have
a rule that rejects it under the other: so a new method, loss or estimator that ignores a key
fails here until a rule (or a ``reads`` declaration) says so.
"""
from dataclasses import fields, is_dataclass, replace

import pytest
import torch

from megatron_skpo.algo.advantages import AdvantageInput, AdvantageParams, compute_advantages
from megatron_skpo.algo.losses import PolicyLossParams
from megatron_skpo.algo.objective import ObjectiveSettings
from megatron_skpo.algo.registries import ADVANTAGES
from megatron_skpo.catalog import build_method
from megatron_skpo.config import ALGORITHMS, ConfigError, load_config
from megatron_skpo.config.algorithms import read_rules, settings_read
from megatron_skpo.settings import config_keys, from_config
from megatron_skpo.trainer.run import value_tracker


class Recorder:
    """A config node that records the dotted path of every leaf value read through it."""

    def __init__(self, node, path: str, seen: set):
        self._node, self._path, self._seen = node, path, seen

    def __getattr__(self, name):
        value, path = getattr(self._node, name), f"{self._path}.{name}" if self._path else name
        if is_dataclass(value) and not isinstance(value, type):
            return Recorder(value, path, self._seen)
        self._seen.add(path)
        return value


def _declared() -> set[str]:
    return {f"algo.{k}" for cls in (PolicyLossParams, AdvantageParams) for k in config_keys(cls).values()}


def algo_reads(cfg) -> set[str]:
    """The ``algo.*`` keys this configuration reads (see the module docstring)."""
    seen: set = set()
    root = Recorder(cfg, "", seen)
    build_method(root, tokenizer=None)
    from_config(ObjectiveSettings, root.algo, "algo", params=None)  # the loss settings: declared below
    value_tracker(root.algo.tracker)
    return {k for k in seen if k.startswith("algo.")} - _declared() | settings_read(cfg)


def ignored_without_rule(reads: dict[str, set[str]], configs: dict) -> list[tuple[str, str]]:
    """(algorithm, key) pairs where another algorithm reads the key, this one does not, and neither a rule
    rejects it nor the name fixes its value (``fixed``: SPO's group_size is 1 whatever is set)."""
    rules, every = read_rules(), set().union(*reads.values())
    out = []
    for name, read in reads.items():
        fixed = ALGORITHMS[configs[name].algo.name].fixed
        for key in sorted(every - read - set(fixed)):
            rule = next((rules[p] for p in _prefixes(key) if p in rules), None)
            if rule is None or rule[0](configs[name]):
                out.append((name, key))
    return out


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


@pytest.fixture(scope="module")
def traced():
    configs = {name: load_config(None, [f"algo.name={name}"]) for name in ALGORITHMS}
    return configs, {name: algo_reads(cfg) for name, cfg in configs.items()}


def test_every_key_an_algorithm_ignores_has_a_rule(traced):
    configs, reads = traced
    assert ignored_without_rule(reads, configs) == []


@pytest.mark.parametrize("overrides, needle", [
    # the gaps the audit closed: each value used to be accepted and ignored
    (["algo.name=gspo", "algo.clip.eps_low=0.1"], "algo.clip.eps_low: set, but read only by the cispo / ppo_clip"),
    (["algo.name=cispo", "algo.clip.dual_clip_c=3"], "algo.clip.dual_clip_c: set, but read only by the ppo_clip"),
    (["algo.name=dr_grpo", "algo.adv_eps=0.1"], "algo.adv_eps: set, but read only by the dense_mc / grpo"),
    (["algo.name=rloo", "algo.std_unbiased=false"], "algo.std_unbiased: set, but read only by"),
    (["algo.name=grpo", "algo.batch_norm_level=sequence"], "algo.batch_norm_level: set, but read only by batch"),
    (["algo.name=spo", "algo.dynamic_sampling=true"], "algo.dynamic_sampling: set, but not read by SPO"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_audited_gaps_fail_at_load_time(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_kin_of_the_audited_gaps_loads_where_read():
    load_config(None, ["algo.name=grpo", "algo.clip.dual_clip_c=3", "algo.adv_eps=0.1"])
    load_config(None, ["algo.name=cispo", "algo.clip.eps_low=0.1"])
    load_config(None, ["algo.name=dr_grpo", "algo.batch_norm_advantages=true", "algo.adv_eps=0.1",
                       "algo.batch_norm_level=sequence"])
    load_config(None, ["algo.name=skpo", "algo.advantage=rloo", "algo.adv_eps=0.1", "algo.clip.dual_clip_c=3"])
    load_config(None, ["algo.name=skpo", "algo.skpo.upstream_loss=gspo", "algo.gspo_eps_low=0.001"])


def test_a_method_that_ignores_a_key_fails(traced):
    """A new method that ignores a key every other method reads, with no rule for it, is reported."""
    configs, reads = traced
    for key in ("algo.kl.coef", "algo.entropy_coef"):
        assert {n: r for n, r in reads.items() if key not in r} == {}
        report = ignored_without_rule({**reads, "new": reads["grpo"] - {key}}, {**configs, "new": configs["grpo"]})
        assert report == [("new", key)]


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_estimator_reads_are_exactly_the_fields_it_uses(name):
    """The declaration behind the estimator rules, checked against the function (batch_norm off)."""
    g = torch.Generator().manual_seed(5)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) > 0.2
    mask[:, 0] = True
    values = torch.rand(6, 5, generator=g, dtype=torch.float64)
    starts = torch.zeros(6, 5, dtype=torch.bool)
    starts[:, ::2] = True
    process = torch.randn(6, 5, generator=g, dtype=torch.float64) * mask
    inp = AdvantageInput(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), mask, torch.full((6,), 0.3, dtype=torch.float64),
                         values, starts, process)
    other = {"eps": 0.5, "std_unbiased": False, "batch_norm_level": "sequence", "dense_mode": "vine",
             "process_coef": 2.0, "outcome_coef": 3.0, "process_norm": "none"}
    assert sorted(other) == sorted(f.name for f in fields(AdvantageParams) if f.name != "batch_norm")
    reads, base = ADVANTAGES.meta(name)["reads"], AdvantageParams()
    ref = compute_advantages(name, inp, base)
    for field, value in other.items():
        changed = not torch.equal(compute_advantages(name, inp, replace(base, **{field: value})), ref)
        assert changed == (field in reads), (name, field, changed)
