"""Algorithm names set their defaults; what contradicts a name, or what it would ignore, is an error
at load time naming the field; recipes inherit and state only what differs from the defaults."""
from pathlib import Path

import pytest
import yaml

from megatron_skpo.config import ALGORITHMS, ConfigError, load_config, read_recipe, to_dict
from megatron_skpo.config.algorithms import READ_WHEN
from megatron_skpo.config.base import leaf_keys

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def test_a_name_sets_its_defaults_even_over_another_recipe():
    cfg = load_config(CONFIGS / "grpo.yaml", ["algo.name=dapo"])  # used to train GRPO: dynamic sampling stayed off
    assert cfg.algo.dynamic_sampling and cfg.algo.overlong_filter and cfg.algo.clip.eps_high == 0.28
    assert load_config(CONFIGS / "dapo.yaml", ["algo.name=grpo"]).algo.dynamic_sampling is False
    cfg = load_config(None, ["algo.name=spo"])
    assert cfg.algo.group_size == 1 and cfg.algo.advantage == "spo" and cfg.train.prompt_sampling == "prioritized"
    # an explicit value wins over the name's default when the name allows it
    assert load_config(None, ["algo.name=dapo", "algo.overlong_filter=false"]).algo.overlong_filter is False


@pytest.mark.parametrize("overrides, needle", [
    # the four cases that used to be accepted, then ignored or failed later
    (["algo.name=dapo", "algo.dynamic_sampling=false"], "algo.dynamic_sampling: False contradicts algo.name='dapo'"),
    (["algo.name=spo", "algo.advantage=grpo"], "algo.advantage: 'grpo' contradicts algo.name='spo'"),
    (["algo.name=grpo", "algo.advantage=dense_mc"], "(for algo.advantage='dense_mc' use algo.name=dense_mc)"),
    (["algo.advantage=spo"], "algo.advantage: 'spo' contradicts algo.name='skpo', which trains with 'grpo' or"),
    # and their kin
    (["algo.name=spo", "algo.group_size=8"], "algo.group_size: 8 contradicts algo.name='spo'"),
    (["algo.name=grpo", "algo.group_size=1"], "algo.group_size: 1; grpo normalises within a group of G >= 2"),
    (["algo.name=grpo", "algo.skpo.w_up=0.3"], "algo.skpo.w_up: set, but read only by SKPO"),
    (["algo.name=grpo", "algo.dense_mc.num_rollouts=4"], "algo.dense_mc.num_rollouts: set, but read only by dense"),
    (["algo.name=grpo", "rollout.downstream_budget=full"], "rollout.downstream_budget: set, but read only by SKPO"),
    (["algo.policy_loss=ppo_clip"], "algo.policy_loss: set, but not read by SKPO"),
    (["algo.loss_agg_mode=token-mean"], "algo.loss_agg_mode: set, but not read by SKPO"),
    (["algo.name=grpo", "algo.gspo_eps_low=0.001"], "algo.gspo_eps_low: set, but read only by the gspo policy loss"),
    (["algo.name=grpo", "algo.norm_length=100"], "algo.norm_length: set, but read only by the seq-mean-token-sum-norm"),
    (["algo.name=grpo", "algo.tracker.rho_min=0.5"], "algo.tracker.rho_min: set, but read only by SPO"),
    (["algo.tracker.priority_floor=0.1"], "algo.tracker.priority_floor: set, but read only by train.prompt_sampling"),
    (["algo.kl.estimator=k1"], "algo.kl.estimator: set, but read only when algo.kl.coef > 0"),
    (["algo.tis.cap=3"], "algo.tis.cap: set, but read only when algo.tis.enabled is true"),
    (["algo.name=ppo"], "algo.name: got 'ppo'; allowed values: 'skpo', 'grpo'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_contradictions_and_ignored_keys_fail_at_load_time(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_read_when_keys_exist_and_kin_is_accepted_where_read():
    default = load_config(None)
    for key in READ_WHEN:  # every rule names a real field or section
        node = default
        for part in key.split("."):
            node = getattr(node, part)
    load_config(None, ["algo.name=gspo", "algo.gspo_eps_low=0.001"])
    load_config(None, ["algo.name=dr_grpo", "algo.norm_length=1024"])
    load_config(None, ["algo.name=grpo", "train.prompt_sampling=prioritized", "algo.tracker.priority_floor=0.1"])
    load_config(None, ["algo.kl.coef=0.01", "algo.kl.estimator=k1"])


def test_every_name_loads_with_its_family_defaults():
    for name, spec in ALGORITHMS.items():
        cfg = load_config(None, [f"algo.name={name}"])
        for key, value in spec.defaults.items():
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (name, key)


def test_optional_sections_take_dotted_overrides():
    cfg = load_config(CONFIGS / "skpo.yaml", ["data.eval.name=mawps_easy", "data.eval.limit=10"])
    assert cfg.data.eval.limit == 10 and cfg.data.eval.name == "mawps_easy"
    assert load_config(CONFIGS / "demo_cpu.yaml", ["data.eval.limit=10"]).data.eval.limit == 10
    with pytest.raises(ConfigError, match="data.eval.name/path: set a recipe name or a file path"):
        load_config(None, ["data.eval.limit=10"])


def test_base_recipes_merge_and_loops_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\noptim: {lr: 2.0e-6}\n")
    (tmp_path / "b.yaml").write_text("optim: {lr: 1.0e-5, warmup_steps: 3}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.optim.lr == 2e-6 and cfg.optim.warmup_steps == 3
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back to itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_config(tmp_path / "c.yaml")


def _effective_default(recipe: Path, key: str):
    """The value ``key`` would have without the recipe's own line (its base and the name's defaults)."""
    own = yaml.safe_load(recipe.read_text())
    base = read_recipe(recipe.parent / own["base"]) if "base" in own else {}
    name = (own.get("algo") or {}).get("name", "skpo")
    node = to_dict(load_config(None, [f"algo.name={name}"]))
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else object()  # inside a null Optional section: no default
    for part in key.split("."):
        if not isinstance(base, dict) or part not in base:
            return node
        base = base[part]
    return base


RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipes_state_only_what_differs(recipe):
    """No recipe repeats a default (the dataclass's, its algorithm's or its base's). configs/skpo.yaml
    is the exception by design: it spells out the paper's settings."""
    if recipe.name == "skpo.yaml":
        return
    own = yaml.safe_load(recipe.read_text()) or {}
    own.pop("base", None)
    repeated = [k for k in leaf_keys(own) if k != "algo.name" and _effective_default(recipe, k) == _get(own, k)]
    assert not repeated, f"{recipe.name} repeats defaults: {repeated}"


def _get(data, key):
    for part in key.split("."):
        data = data[part]
    return data
