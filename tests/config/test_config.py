"""The config tree: strict building, overrides, validation messages, recipes and the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_skpo.config import Config, ConfigError, dump_config, load_config, to_dict
from megatron_skpo.config.base import describe, from_dict
from fake_weights import header_only_weights

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert cfg.algo.name == "skpo" and cfg.algo.group_size == 8
    assert (cfg.algo.clip.eps_low, cfg.algo.clip.eps_high) == (0.2, 0.28)
    assert (cfg.algo.skpo.w_up, cfg.algo.skpo.w_down) == (0.5, 0.5)
    assert cfg.algo.kl.coef == 0.0 and cfg.algo.entropy_coef == 0.0
    t = cfg.algo.tracker
    assert (t.rho_min, t.rho_max, t.d_half, t.drift, t.prior) == (0.875, 0.96, 0.06, "per_prompt", "beta")
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_steps == 10 and cfg.optim.weight_decay == 0.1
    assert cfg.train.prompts_per_step // cfg.train.mini_batch_prompts == 4


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_round_trips(recipe):
    cfg = load_config(recipe)
    again = from_dict(Config, yaml.safe_load(dump_config(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["algo.group_size=16", "optim.lr=2e-6", "algo.clip.dual_clip_c=3",
                             "model.fp8=null", "algo.skpo.selection=min"])
    assert cfg.algo.group_size == 16 and cfg.optim.lr == 2e-6
    assert cfg.algo.clip.dual_clip_c == 3.0 and cfg.model.fp8 is None
    assert cfg.algo.skpo.selection == "min"


@pytest.mark.parametrize("overrides, needle", [
    (["algo.group_sise=4"], "algo.group_sise: unknown key"),
    (["algo.clip.eps_hi=0.3"], "algo.clip.eps_hi: unknown key"),
    (["algo.group_size=four"], "algo.group_size: expected an integer"),
    (["algo.skpo.selection=mean"], "algo.skpo.selection: got 'mean'; allowed values: 'max', 'median'"),
    (["algo.advantage=gae"], "algo.advantage: got 'gae'; allowed values:"),
    (["algo.policy_loss=dpo"], "algo.policy_loss: got 'dpo'"),
    (["train.mini_batch_prompts=48"], "train.mini_batch_prompts: must divide"),
    (["algo.skpo.skip_template=no placeholders"], "skip_template: must contain {segment}"),
    (["algo.clip.eps_low=1.5"], "eps_low: must be in [0, 1)"),
    (["algo.group_size"], "expected key=value"),
    (["rollout.temperature=0"], "rollout.temperature: must be > 0"),
    (["optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),  # trained and saved NaN weights
    (["algo.clip.eps_high=.nan"], "algo.clip.eps_high: expected a finite number"),
    (["optim.lr=2"], "optim.lr: must be in (0, 1)"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay: must be >= 0"),
    (["reward.workers=100000"], "reward.workers: must be in [1, 256]"),
    (["reward.timeout_s=1e9"], "reward.timeout_s: must be in (0, 600]"),
    (["reward.format_penalty=-0.5"], "reward.incorrect + reward.format_penalty: -1.5 is outside [-1, 1]"),
    (["reward.correct=2"], "reward.correct: 2.0 is outside [-1, 1]"),
    (["parallel.ep=0"], "parallel.ep: must be >= 1"),
    (["model.moe_aux_loss_coef=-0.001"], "model.moe_aux_loss_coef: must be >= 0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_unknown_key_in_recipe_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  name: grpo\n  groupsize: 4\n")
    with pytest.raises(ConfigError, match=r"algo\.groupsize: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_help_lists_every_field_with_its_help():
    lines = describe(Config)
    text = "\n".join(lines)
    assert "group_size: 8  # G: responses per prompt" in text
    assert all("#" in line for line in lines)


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_skpo.cli.train", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


def test_cli_help_dry_run_and_errors(tmp_path):
    out = _cli("--help")
    assert out.returncode == 0 and "d_half: 0.06" in out.stdout
    # the paper recipe where its model and data are not: the resolved config, then every problem on a line
    out = _cli("configs/skpo.yaml", "--dry-run", "algo.group_size=4", f"logging.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and yaml.safe_load(out.stdout)["algo"]["group_size"] == 4
    for needle in ("model.hf_path: checkpoints/Qwen2.5-Math-7B has no config.json",
                   "data.train.path: no such file data/dapo-math-17k.parquet",
                   "parallel.tp x parallel.pp = 2 x 1 does not divide the world size 1"):
        assert needle in out.stderr, out.stderr
    model, data = tmp_path / "model", tmp_path / "dapo.parquet"
    model.mkdir()
    (model / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 2, '
                                       '"intermediate_size": 64, "num_hidden_layers": 2}')
    header_only_weights(model, 2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # --dry-run reads the data file's first rows: a real (one-row) file in the recipe's layout
    pq.write_table(pa.table({"prompt": ["1+1?"], "reward_model": [{"ground_truth": "2"}]}), data)
    out = _cli("configs/skpo.yaml", "--dry-run", f"model.hf_path={model}", f"data.train.path={data}",
               f"logging.dir={tmp_path / 'run'}", env={**os.environ, "WORLD_SIZE": "2"})
    assert out.returncode == 0, out.stderr
    out = _cli("configs/skpo.yaml", "--dry-run", "algo.nope=1")
    assert out.returncode == 2 and "algo.nope: unknown key" in out.stderr
    out = _cli("configs/skpo.yaml", "--dry-run", "algo.loss_agg_mode=mean")
    assert out.returncode == 2 and "algo.loss_agg_mode: got 'mean'" in out.stderr


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-6 as a string; users write it that way in recipes and overrides.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 3e-6\n")
    assert load_config(recipe).optim.lr == 3e-6
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
